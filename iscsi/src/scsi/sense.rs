//! Sense data (SPC-4 4.5.3, fixed format) and the ways a command can fail.
//!
//! Every error a command handler returns is a [`Failure`]; the dispatcher turns it into
//! status and sense bytes in one place ([`Failure::into_response`]), so no handler builds
//! sense bytes by hand.

use bytes::Bytes;

use crate::lu::{status, DeviceError, ScsiResponse};

/// Sense keys (SPC-4 table 54) the target uses.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const COPY_ABORTED: u8 = 0xA;
    pub const ABORTED_COMMAND: u8 = 0xB;
    pub const MISCOMPARE: u8 = 0xE;
}

/// The sense key specific field of an ILLEGAL REQUEST (SPC-4 4.5.2.4.2): which byte (and
/// bit) of the CDB or parameter list was wrong, so an initiator can tell what we refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True when the pointer is into the CDB, false for the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// One fixed-format sense record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (e.g. the miscompare offset); VALID is set when present and
    /// it fits the fixed format's 4 bytes.
    pub info: Option<u64>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq, info: None, field: None }
    }

    pub const fn invalid_opcode() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00)
    }
    pub const fn lba_out_of_range() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }
    /// INVALID FIELD IN CDB with a pointer to the offending byte (and bit, when one bit is
    /// to blame).
    pub const fn invalid_cdb(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            field: Some(FieldPointer { in_cdb: true, byte, bit }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }
    pub const fn param_list_length() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }
    pub const fn invalid_param(byte: u16, bit: Option<u8>) -> Self {
        Sense {
            field: Some(FieldPointer { in_cdb: false, byte, bit }),
            ..Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }
    /// INVALID FIELD IN INFORMATION UNIT: the Data-Out carried less than the CDB needs
    /// (what libiscsi's residual tests accept besides a truncated write).
    pub const fn short_data_out() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x0E, 0x03)
    }
    pub const fn lun_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }
    pub const fn saving_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00)
    }
    /// INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const fn invalid_release() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04)
    }
    /// MISCOMPARE DURING VERIFY OPERATION, at `offset` bytes into the compared data.
    pub const fn miscompare(offset: u64) -> Self {
        Sense { info: Some(offset), ..Sense::new(key::MISCOMPARE, 0x1D, 0x00) }
    }
    pub const fn read_error() -> Self {
        Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)
    }
    pub const fn write_error() -> Self {
        Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00)
    }
    /// NOT READY, ASYMMETRIC ACCESS STATE TRANSITION: the ALUA handler of the initiator
    /// retries and re-reads the port group states.
    pub const fn alua_transitioning() -> Self {
        Sense::new(key::NOT_READY, 0x04, 0x0A)
    }
    pub const fn alua_standby() -> Self {
        Sense::new(key::NOT_READY, 0x04, 0x0B)
    }
    pub const fn alua_unavailable() -> Self {
        Sense::new(key::NOT_READY, 0x04, 0x0C)
    }
    /// NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY: Linux retries this with a
    /// delay until the command times out, which is what a briefly unavailable volume needs
    /// (BUSY would be retried too, but only a few times by some initiators).
    pub const fn becoming_ready() -> Self {
        Sense::new(key::NOT_READY, 0x04, 0x01)
    }
    /// LOGICAL UNIT SOFTWARE WRITE PROTECTED: the Control mode page's SWP is set (SBC-3
    /// 4.12, SPC-4 7.5.8).
    pub const fn software_write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x02)
    }
    /// WRITE PROTECTED: the LUN maps its unit read-only (the target's configuration).
    pub const fn write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x00)
    }
    pub const fn power_on_reset() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x29, 0x00)
    }
    pub const fn reservations_preempted() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x03)
    }
    pub const fn reservations_released() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x04)
    }
    pub const fn registrations_preempted() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x05)
    }
    /// CAPACITY DATA HAS CHANGED: the volume behind the unit was resized.
    pub const fn capacity_changed() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x09)
    }
    /// REPORTED LUNS DATA HAS CHANGED: LUNs were added to the target (SPC-4 6.33).
    pub const fn reported_luns_changed() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x3F, 0x0E)
    }
    pub const fn mode_parameters_changed() -> Self {
        Sense::new(key::UNIT_ATTENTION, 0x2A, 0x01)
    }
    /// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR: the transport lost or damaged some of
    /// the command's data (an iSCSI data digest error, RFC 7143 7.8 and 11.4.7.2).
    pub const fn protocol_service_crc_error() -> Self {
        Sense::new(key::ABORTED_COMMAND, 0x47, 0x05)
    }
    pub const fn no_sense() -> Self {
        Sense::new(key::NO_SENSE, 0x00, 0x00)
    }

    /// The 18-byte fixed-format record (response code 70h, current error).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key & 0x0F;
        if let Some(info) = self.info {
            // The fixed format holds 32 bits; a larger value is reported without VALID
            // rather than truncated to a wrong offset.
            if let Ok(v) = u32::try_from(info) {
                b[0] |= 0x80;
                b[3..7].copy_from_slice(&v.to_be_bytes());
            }
        }
        b[7] = 10; // additional sense length: bytes 8..18
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            b[15] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                b[15] |= 0x08 | (bit & 0x07);
            }
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        Bytes::copy_from_slice(&b)
    }
}

/// Why a command did not complete with GOOD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT (no sense data).
    Conflict,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Failure::Check(s)
    }
}

impl Failure {
    pub fn into_response(self) -> ScsiResponse {
        match self {
            Failure::Check(s) => ScsiResponse {
                status: status::CHECK_CONDITION,
                sense: Some(s.to_bytes()),
                ..Default::default()
            },
            Failure::Conflict => ScsiResponse {
                status: status::RESERVATION_CONFLICT,
                ..Default::default()
            },
        }
    }
}

/// Which kind of access failed: the same device error means a different sense code for a
/// read (UNRECOVERED READ ERROR) than for a write (WRITE ERROR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    Read,
    Write,
}

/// The one place a [`DeviceError`] becomes sense data.
pub fn device_error(e: &DeviceError, io: Io) -> Failure {
    let sense = match e {
        DeviceError::Io(_) => match io {
            Io::Read => Sense::read_error(),
            Io::Write => Sense::write_error(),
        },
        DeviceError::Transitioning(_) => Sense::alua_transitioning(),
        DeviceError::Unavailable(_) => Sense::becoming_ready(),
        DeviceError::OutOfRange => Sense::lba_out_of_range(),
    };
    tracing::debug!(error = %e, asc = sense.asc, ascq = sense.ascq, "device error");
    Failure::Check(sense)
}

pub type CmdResult<T = Bytes> = Result<T, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_field_sets_sksv_cd_and_bit_pointer() {
        let b = Sense::invalid_cdb(2, Some(5)).to_bytes();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], key::ILLEGAL_REQUEST);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&b[16..18], &[0, 2]);
    }

    #[test]
    fn miscompare_offset_in_information_with_valid() {
        let b = Sense::miscompare(513).to_bytes();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], key::MISCOMPARE);
        assert_eq!(&b[3..7], &513u32.to_be_bytes());
        assert_eq!((b[12], b[13]), (0x1D, 0x00));
        // Too large for the fixed format: no VALID bit, no bogus value.
        let b = Sense::miscompare(1 << 40).to_bytes();
        assert_eq!(b[0], 0x70);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
    }
}
