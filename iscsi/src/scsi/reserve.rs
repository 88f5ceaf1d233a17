//! SPC-2 reservations: RESERVE and RELEASE (6 and 10). One I_T nexus reserves the whole
//! unit; until it releases it, loses its nexus (logout or dropped session) or someone resets
//! the unit or the target, every other nexus gets RESERVATION CONFLICT for everything but
//! INQUIRY, REQUEST SENSE, REPORT LUNS and RELEASE (SPC-2 5.5.1; RELEASE from a non-holder
//! is GOOD and changes nothing). Older cluster software (Windows Server 2003 clusters,
//! some backup tools) still fences with these.
//!
//! The holder is stored with the persistent reservations ([`Reservations::reserved_by`]),
//! changed by compare-and-swap like them, so a unit served by several nodes has one SPC-2
//! reservation whichever portal the initiators use. Mixing the two kinds is refused as
//! SPC-4 5.12.3 says for a unit without Compatible Reservation Handling (CRH = 0 in PR
//! REPORT CAPABILITIES): while any nexus is registered, RESERVE and RELEASE conflict; while
//! the unit is reserved, PERSISTENT RESERVE IN and OUT conflict, for every nexus.
//!
//! A node that leaves the cluster takes its sessions with it: a reservation held through a
//! target port no longer among the unit's port groups (ALUA lists the live nodes' ports) is
//! void, and the first command to see that drops it. A node that restarts before it is
//! declared dead keeps its port, and drops the reservations held through it when it starts
//! (`ClusterTargets::forget_own_reservations`, before its portal serves anyone).
//!
//! Not supported: third-party reservations (3RDPTY, LONGID) and extents (obsolete), refused
//! with INVALID FIELD IN CDB.

use bytes::Bytes;

use super::sense::{CmdResult, Failure, Sense};
use super::*;
use crate::lu::{ReservedBy, Reservations};

fn is(holder: &ReservedBy, me: &NexusKey) -> bool {
    holder.initiator_port == me.0 && holder.relative_port == me.1
}

/// Whether `cmd` from `me` conflicts with the SPC-2 reservation in `st`.
pub fn conflicts(st: &Reservations, cmd: Cmd, me: &NexusKey) -> bool {
    let Some(holder) = &st.reserved_by else {
        // Unreserved: only RESERVE and RELEASE can conflict, with registrations.
        return matches!(cmd, Cmd::Reserve | Cmd::Release) && !st.registrations.is_empty();
    };
    match cmd {
        Cmd::Inquiry | Cmd::RequestSense | Cmd::ReportLuns | Cmd::Release => false,
        Cmd::PersistentReserveIn | Cmd::PersistentReserveOut => true,
        _ => !is(holder, me),
    }
}

/// Checks the fields we do not support: 3RDPTY and EXTENT, and LONGID in the 10-byte form.
fn check_cdb(cdb: Cdb<'_>) -> CmdResult<()> {
    let flags = cdb.u8(1);
    if flags & 0x10 != 0 {
        return Err(Sense::invalid_cdb(1, Some(4)).into());
    }
    if cdb.op() >= 0x20 && flags & 0x02 != 0 {
        return Err(Sense::invalid_cdb(1, Some(1)).into());
    }
    if flags & 0x01 != 0 {
        return Err(Sense::invalid_cdb(1, Some(0)).into());
    }
    Ok(())
}

impl LogicalUnit {
    /// RESERVE(6/10): reserve the unit for this nexus (again: GOOD, nothing changes).
    pub(super) async fn reserve(&self, ctx: &Ctx<'_>) -> CmdResult {
        check_cdb(ctx.cdb)?;
        let me = ctx.key;
        // (A holder that left was dropped by the conflict check before this ran.)
        self.change_reserved(|st| {
            if !st.registrations.is_empty() {
                return Err(Failure::Conflict);
            }
            match &st.reserved_by {
                Some(h) if is(h, me) => Ok(false),
                Some(_) => Err(Failure::Conflict),
                None => {
                    st.reserved_by = Some(ReservedBy { initiator_port: me.0.clone(), relative_port: me.1 });
                    Ok(true)
                }
            }
        })
        .await?;
        Ok(Bytes::new())
    }

    /// RELEASE(6/10): the holder releases; anyone else gets GOOD and changes nothing.
    pub(super) async fn release(&self, ctx: &Ctx<'_>) -> CmdResult {
        check_cdb(ctx.cdb)?;
        let me = ctx.key;
        self.change_reserved(|st| {
            if !st.registrations.is_empty() {
                return Err(Failure::Conflict);
            }
            Ok(release_if(st, |h| is(h, me)))
        })
        .await?;
        Ok(Bytes::new())
    }

    /// Drops the SPC-2 reservation if `who` holds it (nexus loss), or whoever holds it when
    /// `who` is `None` (resets). Failures are logged: there is no command to fail.
    pub(super) async fn drop_reserved(&self, who: Option<&NexusKey>) {
        let outcome = self.change_reserved(|st| Ok(release_if(st, |h| who.is_none_or(|w| is(h, w))))).await;
        if let Err(e) = outcome {
            tracing::warn!(naa = ?self.identity.naa, error = ?e, "could not drop the SPC-2 reservation");
        }
    }

    /// Drops (in `st` and in the store) an SPC-2 reservation held through a target port that
    /// is not among the unit's port groups any more: its node left, and the nexus with it.
    /// An empty list means the groups are unknown right now, not that every port left.
    pub(super) async fn forget_departed_holder(&self, st: &mut Reservations) {
        let Some(h) = &st.reserved_by else { return };
        let groups = self.alua.port_groups().await;
        if groups.is_empty() || groups.iter().any(|g| g.ports.contains(&h.relative_port)) {
            return;
        }
        let who: NexusKey = (h.initiator_port.clone(), h.relative_port);
        tracing::info!(naa = ?self.identity.naa, holder = %who.0, port = who.1, "dropping the SPC-2 reservation of a nexus whose target port left");
        self.drop_reserved(Some(&who)).await;
        st.reserved_by = None;
    }

    /// Changes the stored state (`change` returns whether it changed anything); the other
    /// nodes serving the unit are told to reload. SPC-2 changes raise no unit attention.
    async fn change_reserved(&self, mut change: impl FnMut(&mut Reservations) -> CmdResult<bool>) -> CmdResult<()> {
        let stored = self.update_reservations(|st| Ok(change(st)?.then_some(()))).await?;
        if let (Some(()), Some(events)) = (stored, &self.events) {
            events.reservations_changed(&[]).await;
        }
        Ok(())
    }
}

fn release_if(st: &mut Reservations, pred: impl FnOnce(&ReservedBy) -> bool) -> bool {
    match &st.reserved_by {
        Some(h) if pred(h) => {
            st.reserved_by = None;
            true
        }
        _ => false,
    }
}
