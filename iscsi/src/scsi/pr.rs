//! Persistent reservations (SPC-4 5.12, 6.15, 6.16): the conflict rules every command is
//! checked against, PERSISTENT RESERVE IN, and PERSISTENT RESERVE OUT as a
//! compare-and-swap on the unit's [`ReservationStore`] (load, change, store; redo on a lost
//! race), so nodes serving the same unit never overwrite each other's changes.
//!
//! Not supported: SPEC_I_PT, ALL_TG_PT (both refused, and REPORT CAPABILITIES says so),
//! REGISTER AND MOVE (invalid service action). SPC-2 RESERVE/RELEASE are in `reserve`.

use bytes::Bytes;

use super::cdb::{be64, truncate};
use super::sense::{device_error, CmdResult, Failure, Io, Sense};
use super::*;
use crate::lu::{Registration, Reservation, Reservations};

/// Reservation types (the TYPE field).
const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const VALID_TYPES: [u8; 6] = [1, 3, 5, 6, 7, 8];

fn all_registrants(kind: u8) -> bool {
    kind == 7 || kind == 8
}

/// What a command wants to do with the medium, for the conflict check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Read,
    Write,
}

fn is_me(port: &str, rel: u16, me: &NexusKey) -> bool {
    port == me.0 && rel == me.1
}

fn registration<'a>(st: &'a Reservations, me: &NexusKey) -> Option<&'a Registration> {
    st.registrations.iter().find(|r| is_me(&r.initiator_port, r.relative_port, me))
}

/// Whether `me` holds the reservation: the reserving nexus, or any registrant for the
/// all-registrants types.
fn holds(h: &Reservation, st: &Reservations, me: &NexusKey) -> bool {
    if all_registrants(h.kind) {
        registration(st, me).is_some()
    } else {
        is_me(&h.initiator_port, h.relative_port, me)
    }
}

/// Whether a command of `nexus` conflicts with the reservation in `st` (SPC-4 table 62,
/// SBC-3 table 13): Write Exclusive types let everyone read; Exclusive Access types let
/// no one else in; the registrants-only and all-registrants types treat registrants like
/// the holder.
pub fn conflicts(st: &Reservations, nexus: &Nexus, want: Want) -> bool {
    let Some(h) = &st.holder else { return false };
    let me = nexus_key(nexus);
    if holds(h, st, &me) {
        return false;
    }
    let registered = registration(st, &me).is_some();
    match h.kind {
        WRITE_EXCLUSIVE => want == Want::Write,
        EXCLUSIVE_ACCESS => true,
        5 | 7 => want == Want::Write && !registered,
        6 | 8 => !registered,
        _ => true,
    }
}

/// A decoded PERSISTENT RESERVE OUT.
struct Request {
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
    aptpl: bool,
}

/// The outcome of applying a request to a loaded state.
#[derive(Default)]
struct Changes {
    changed: bool,
    attentions: Vec<(NexusKey, Sense)>,
}

impl Changes {
    fn tell(&mut self, who: &Registration, sense: Sense) {
        self.attentions.push(((who.initiator_port.clone(), who.relative_port), sense));
    }
}

/// How often a reservation change is redone after losing the compare-and-swap before we
/// give up with a retryable NOT READY.
const MAX_CAS_ATTEMPTS: usize = 64;

/// Removes `me`'s registration (key 0 in REGISTER), releasing what it held.
fn unregister(st: &mut Reservations, me: &NexusKey, ch: &mut Changes) {
    st.registrations.retain(|r| !is_me(&r.initiator_port, r.relative_port, me));
    if let Some(h) = st.holder.clone() {
        if all_registrants(h.kind) {
            // Held by all registrants: released with the last of them.
            if st.registrations.is_empty() {
                st.holder = None;
            }
        } else if is_me(&h.initiator_port, h.relative_port, me) {
            st.holder = None;
            // SPC-4 5.12.11.2.2: losing a registrants-only reservation this way is
            // announced to the other registrants.
            if h.kind == 5 || h.kind == 6 {
                for r in &st.registrations {
                    ch.tell(r, Sense::reservations_released());
                }
            }
        }
    }
}

/// Removes every registration with `key` except `me`'s; returns the removed ones.
fn remove_key(st: &mut Reservations, key: u64, me: &NexusKey) -> Vec<Registration> {
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut st.registrations)
        .into_iter()
        .partition(|r| r.key == key && !is_me(&r.initiator_port, r.relative_port, me));
    st.registrations = kept;
    gone
}

fn apply(st: &mut Reservations, req: &Request, me: &NexusKey) -> CmdResult<Changes> {
    let mut ch = Changes::default();
    let mine = registration(st, me).map(|r| r.key);
    match req.sa {
        // REGISTER, REGISTER AND IGNORE EXISTING KEY.
        0x00 | 0x06 => {
            let ignore = req.sa == 0x06;
            match mine {
                None => {
                    if !ignore && req.key != 0 {
                        return Err(Failure::Conflict);
                    }
                    if req.sa_key == 0 {
                        return Ok(ch); // unregistered nexus "unregistering": no-op
                    }
                    st.registrations.push(Registration {
                        initiator_port: me.0.clone(),
                        relative_port: me.1,
                        key: req.sa_key,
                    });
                }
                Some(k) => {
                    if !ignore && k != req.key {
                        return Err(Failure::Conflict);
                    }
                    if req.sa_key == 0 {
                        unregister(st, me, &mut ch);
                    } else {
                        for r in st.registrations.iter_mut() {
                            if is_me(&r.initiator_port, r.relative_port, me) {
                                r.key = req.sa_key;
                            }
                        }
                        if let Some(h) = st.holder.as_mut() {
                            if is_me(&h.initiator_port, h.relative_port, me) {
                                h.key = req.sa_key;
                            }
                        }
                    }
                }
            }
            st.aptpl = req.aptpl;
            st.generation = st.generation.wrapping_add(1);
            ch.changed = true;
        }
        // RESERVE.
        0x01 => {
            if mine != Some(req.key) {
                return Err(Failure::Conflict);
            }
            match st.holder.clone() {
                None => {
                    st.holder = Some(Reservation {
                        initiator_port: me.0.clone(),
                        relative_port: me.1,
                        key: req.key,
                        kind: req.kind,
                    });
                    ch.changed = true;
                }
                // Reserving again what one holds is a no-op; anything else conflicts.
                Some(h) if holds(&h, st, me) && h.kind == req.kind => {}
                Some(_) => return Err(Failure::Conflict),
            }
        }
        // RELEASE.
        0x02 => {
            if mine != Some(req.key) {
                return Err(Failure::Conflict);
            }
            let Some(h) = st.holder.clone() else { return Ok(ch) };
            if !holds(&h, st, me) {
                return Ok(ch); // not the holder: nothing happens, GOOD
            }
            if h.kind != req.kind {
                return Err(Sense::invalid_release().into());
            }
            st.holder = None;
            ch.changed = true;
            if h.kind != WRITE_EXCLUSIVE && h.kind != EXCLUSIVE_ACCESS {
                for r in &st.registrations {
                    if !is_me(&r.initiator_port, r.relative_port, me) {
                        ch.tell(r, Sense::reservations_released());
                    }
                }
            }
        }
        // CLEAR.
        0x03 => {
            if mine != Some(req.key) {
                return Err(Failure::Conflict);
            }
            for r in &st.registrations {
                if !is_me(&r.initiator_port, r.relative_port, me) {
                    ch.tell(r, Sense::reservations_preempted());
                }
            }
            st.registrations.clear();
            st.holder = None;
            st.generation = st.generation.wrapping_add(1);
            ch.changed = true;
        }
        // PREEMPT, PREEMPT AND ABORT (the transport owns the tasks; the abort part is
        // the same as a preempt for the unit's state).
        0x04 | 0x05 => {
            if mine != Some(req.key) {
                return Err(Failure::Conflict);
            }
            let new_holder = Reservation {
                initiator_port: me.0.clone(),
                relative_port: me.1,
                key: req.key,
                kind: req.kind,
            };
            match st.holder.clone() {
                Some(h) if all_registrants(h.kind) && req.sa_key == 0 => {
                    // Preempt an all-registrants reservation: everyone else goes.
                    let others: Vec<_> = st
                        .registrations
                        .iter()
                        .filter(|r| !is_me(&r.initiator_port, r.relative_port, me))
                        .cloned()
                        .collect();
                    for r in &others {
                        ch.tell(r, Sense::reservations_preempted());
                    }
                    st.registrations.retain(|r| is_me(&r.initiator_port, r.relative_port, me));
                    st.holder = Some(new_holder);
                }
                Some(h) if !all_registrants(h.kind) && req.sa_key == h.key => {
                    let gone = remove_key(st, req.sa_key, me);
                    for r in &gone {
                        ch.tell(r, Sense::reservations_preempted());
                    }
                    if h.kind != req.kind {
                        for r in &st.registrations {
                            if !is_me(&r.initiator_port, r.relative_port, me) {
                                ch.tell(r, Sense::reservations_released());
                            }
                        }
                    }
                    st.holder = Some(new_holder);
                }
                _ => {
                    // No reservation, or SARK names other registrants: remove those.
                    if req.sa_key == 0 {
                        return Err(Sense::invalid_param(8, None).into());
                    }
                    let before = st.registrations.iter().filter(|r| r.key == req.sa_key).count();
                    let gone = remove_key(st, req.sa_key, me);
                    if before == 0 {
                        return Err(Failure::Conflict);
                    }
                    for r in &gone {
                        ch.tell(r, Sense::registrations_preempted());
                    }
                }
            }
            st.generation = st.generation.wrapping_add(1);
            ch.changed = true;
        }
        _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
    }
    Ok(ch)
}

/// An iSCSI initiator port TransportID (SPC-4 7.6.4.6, format 01b): the port name,
/// NUL terminated and padded to a multiple of 4 bytes.
fn transport_id(port: &str) -> Vec<u8> {
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    // Multiple of 4, and at least 20 bytes for the whole TransportID (SPC-4 7.6.4.6).
    name.resize((name.len().div_ceil(4) * 4).max(16), 0);
    let mut t = vec![0x40 | 0x05, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend(name);
    t
}

impl LogicalUnit {
    /// Establishes the attentions a stored reservation change raised, here and, through
    /// the unit's events, on the nodes serving the other nexuses. A nexus of the port the
    /// command came through is registered if it is unknown (a registrant that logged out
    /// sees its attention when it is back); on other ports only the nexuses seen here are
    /// served here.
    async fn tell_changed_reservations(&self, attentions: Vec<(NexusKey, Sense)>, me: &NexusKey) {
        for (who, sense) in &attentions {
            let extra = if who.1 == me.1 { std::slice::from_ref(who) } else { &[] };
            self.post_attention(*sense, extra, |k| k == who);
        }
        if let Some(events) = &self.events {
            let all: Vec<NexusAttention> = attentions
                .into_iter()
                .map(|((initiator_port, relative_port), s)| NexusAttention {
                    initiator_port,
                    relative_port,
                    sense_key: s.key,
                    asc: s.asc,
                    ascq: s.ascq,
                })
                .collect();
            events.reservations_changed(&all).await;
        }
    }

    pub(super) async fn load_reservations(&self) -> CmdResult<(Reservations, u64)> {
        self.reservations.load().await.map_err(|e| device_error(&e, Io::Read))
    }

    pub(super) async fn persistent_reserve_in(&self, ctx: &Ctx<'_>) -> CmdResult {
        let alloc = usize::from(ctx.cdb.u16(7));
        let (st, _) = self.load_reservations().await?;
        let mut d = Vec::new();
        match ctx.cdb.service_action() {
            // READ KEYS
            0x00 => {
                d.extend_from_slice(&st.generation.to_be_bytes());
                d.extend_from_slice(&((st.registrations.len() * 8) as u32).to_be_bytes());
                for r in &st.registrations {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            // READ RESERVATION
            0x01 => {
                d.extend_from_slice(&st.generation.to_be_bytes());
                match &st.holder {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(h) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        // All-registrants reservations report key 0 (SPC-4 6.15.3.3).
                        let key = if all_registrants(h.kind) { 0 } else { h.key };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, h.kind & 0x0F, 0, 0]);
                    }
                }
            }
            // REPORT CAPABILITIES
            0x02 => {
                d = vec![0u8; 8];
                d[1] = 8;
                d[2] = 0x01; // PTPL_C: state always persists (it lives in the cluster)
                d[3] = 0x80 | u8::from(st.aptpl); // TMV, PTPL_A
                d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR EX_AC_RO WR_EX_RO EX_AC WR_EX
                d[5] = 0x01; // EX_AC_AR
            }
            // READ FULL STATUS
            0x03 => {
                let mut body = Vec::new();
                for r in &st.registrations {
                    let key = (r.initiator_port.clone(), r.relative_port);
                    let holder = st.holder.as_ref().filter(|h| holds(h, &st, &key));
                    let tid = transport_id(&r.initiator_port);
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    body.push(u8::from(holder.is_some()));
                    body.push(holder.map_or(0, |h| h.kind & 0x0F));
                    body.extend_from_slice(&[0; 4]);
                    body.extend_from_slice(&r.relative_port.to_be_bytes());
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend(tid);
                }
                d.extend_from_slice(&st.generation.to_be_bytes());
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend(body);
            }
            _ => return Err(Sense::invalid_cdb(1, Some(4)).into()),
        }
        Ok(truncate(d, alloc))
    }

    pub(super) async fn persistent_reserve_out(&self, ctx: &Ctx<'_>) -> CmdResult {
        let cdb = ctx.cdb;
        let sa = cdb.service_action();
        let scope = cdb.u8(2) >> 4;
        let kind = cdb.u8(2) & 0x0F;
        if matches!(sa, 0x01 | 0x02 | 0x04 | 0x05) {
            if scope != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)).into()); // LU_SCOPE only
            }
            if !VALID_TYPES.contains(&kind) {
                return Err(Sense::invalid_cdb(2, Some(3)).into());
            }
        }
        // Without SPEC_I_PT the list is always 24 bytes (SPC-4 6.16.3).
        if cdb.u32(5) != 24 {
            return Err(Sense::param_list_length().into());
        }
        let list = ctx.cmd.data_out.get(..24).ok_or(Sense::param_list_length())?;
        if list[20] & 0x08 != 0 {
            return Err(Sense::invalid_param(20, Some(3)).into()); // SPEC_I_PT
        }
        if list[20] & 0x04 != 0 {
            return Err(Sense::invalid_param(20, Some(2)).into()); // ALL_TG_PT
        }
        let req = Request {
            sa,
            kind,
            key: be64(list, 0),
            sa_key: be64(list, 8),
            aptpl: list[20] & 0x01 != 0,
        };
        let stored = self
            .update_reservations(|st| {
                let ch = apply(st, &req, ctx.key)?;
                Ok(ch.changed.then_some(ch.attentions))
            })
            .await?;
        if let Some(attentions) = stored {
            self.tell_changed_reservations(attentions, ctx.key).await;
        }
        Ok(Bytes::new())
    }

    /// Load, change, store as a compare-and-swap, redone on a lost race: `change` returns
    /// `None` when it changed nothing, else the unit attentions the change raises, which
    /// are returned once the new state is stored (telling anyone is the caller's job).
    pub(super) async fn update_reservations<A>(
        &self,
        mut change: impl FnMut(&mut Reservations) -> CmdResult<Option<A>>,
    ) -> CmdResult<Option<A>> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut st, version) = self.load_reservations().await?;
            let Some(raised) = change(&mut st)? else { return Ok(None) };
            let stored = self
                .reservations
                .store(&st, version)
                .await
                .map_err(|e| device_error(&e, Io::Write))?;
            if stored {
                return Ok(Some(raised));
            }
        }
        tracing::warn!("reservation update kept losing the race; asking for a retry");
        Err(Sense::becoming_ready().into())
    }
}
