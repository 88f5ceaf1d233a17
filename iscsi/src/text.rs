//! iSCSI text keys (RFC 7143 section 6 and 13): `key=value` pairs separated by NUL, split
//! over several PDUs with the C bit, and the target's side of login/text negotiation,
//! producing the typed [`SessionParams`] the connection runs with.
//!
//! The target is always the responder here: initiators offer, we answer with the result
//! of each key's rule (min, max, AND, OR, first acceptable list element) or a declaration.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest key name (RFC 7143 6.1: standard-label up to 63 characters).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept. Most keys are limited to 255 bytes; CHAP binary values can be
/// longer (8 KiB would hold any sane challenge).
pub const MAX_VALUE_LEN: usize = 8192;
/// Cap on the text of one request spread over C-bit PDUs, so an initiator cannot make us
/// buffer without bound.
pub const MAX_TEXT_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text of {0} bytes exceeds {MAX_TEXT_LEN}")]
    TooLong(usize),
    #[error("pair without '=': {0:?}")]
    NoEquals(String),
    #[error("invalid key name {0:?}")]
    BadKey(String),
    #[error("value of {key} is {len} bytes long")]
    ValueTooLong { key: String, len: usize },
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Parses a complete text segment. Trailing NULs (the last pair's terminator and padding
/// some initiators add) are tolerated; empty pairs are skipped.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    if data.len() > MAX_TEXT_LEN {
        return Err(TextError::TooLong(data.len()));
    }
    let mut out = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or_else(|| TextError::NoEquals(s.chars().take(64).collect()))?;
        let key_ok = !k.is_empty()
            && k.len() <= MAX_KEY_LEN
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || b".-+@_#".contains(&c));
        if !key_ok {
            return Err(TextError::BadKey(k.chars().take(64).collect()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(TextError::ValueTooLong { key: k.to_string(), len: v.len() });
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0…`.
pub fn encode(pairs: &[(String, String)]) -> Bytes {
    let mut b = BytesMut::new();
    for (k, v) in pairs {
        b.put_slice(k.as_bytes());
        b.put_u8(b'=');
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.freeze()
}

/// Gathers the data of a request sent over several PDUs (C bit set on all but the last).
#[derive(Default, Debug)]
pub struct Accumulator {
    buf: BytesMut,
}

impl Accumulator {
    /// Adds one PDU's data; returns the whole text once `cont` is false.
    pub fn push(&mut self, data: &[u8], cont: bool) -> Result<Option<Bytes>, TextError> {
        if self.buf.len() + data.len() > MAX_TEXT_LEN {
            let len = self.buf.len() + data.len();
            self.buf.clear();
            return Err(TextError::TooLong(len));
        }
        self.buf.put_slice(data);
        if cont {
            Ok(None)
        } else {
            Ok(Some(std::mem::take(&mut self.buf).freeze()))
        }
    }
}

/// Splits a response into chunks of at most `max` bytes (the peer's
/// MaxRecvDataSegmentLength); all but the last go out with the C bit.
pub fn chunks(data: &Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    if data.is_empty() {
        return vec![Bytes::new()];
    }
    (0..data.len()).step_by(max).map(|o| data.slice(o..(o + max).min(data.len()))).collect()
}

/// The kind of session being logged in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// What the target is willing to do (the target's side of each negotiation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetLimits {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u16,
    /// Whether we want InitialR2T=Yes (false lets initiators send unsolicited data).
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    /// Digests we accept (CRC32C and None are both always offered if this is true).
    pub digests: bool,
}

impl Default for TargetLimits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 8,
            initial_r2t: false,
            immediate_data: true,
            default_time2wait: 2,
            default_time2retain: 0,
            digests: true,
        }
    }
}

/// The negotiated parameters of a session/connection. Defaults are RFC 7143's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Largest data segment the initiator accepts (what we may send).
    pub initiator_max_recv_dsl: u32,
    /// Largest data segment we accept (what we declared).
    pub target_max_recv_dsl: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    pub session_type: SessionType,
    pub initiator_name: Option<String>,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
}

impl Default for SessionParams {
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            initiator_max_recv_dsl: 8192,
            target_max_recv_dsl: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            session_type: SessionType::Normal,
            initiator_name: None,
            initiator_alias: None,
            target_name: None,
        }
    }
}

/// A negotiation failure that ends the login (mapped to a login status by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("unsupported SessionType {0:?}")]
    SessionType(String),
    #[error("no acceptable value for {0}")]
    NoCommonValue(&'static str),
    #[error("{0} may not be sent by an initiator")]
    TargetOnlyKey(String),
}

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// The target's negotiation state over a whole login (keys may come in several PDUs).
#[derive(Debug)]
pub struct Negotiator {
    pub limits: TargetLimits,
    pub params: SessionParams,
    declared_mrdsl: bool,
}

/// Keys that only exist during login (leading-only or connection-only login keys); an
/// initiator offering them in a full-feature Text Request gets `Reject`.
const LOGIN_ONLY: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitiatorName",
    "TargetName",
    "InitiatorAlias",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "SessionType",
    "AuthMethod",
];

/// Keys without meaning in a discovery session (RFC 7143 13: answered `Irrelevant`).
const DISCOVERY_IRRELEVANT: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
];

impl Negotiator {
    pub fn new(limits: TargetLimits) -> Self {
        let params = SessionParams {
            target_max_recv_dsl: limits.max_recv_data_segment_length,
            ..Default::default()
        };
        Self { limits, params, declared_mrdsl: false }
    }

    /// Applies the initiator's offers of one login request and returns our answers.
    /// Security keys (AuthMethod, CHAP_*) are left to the caller: they are skipped here.
    pub fn login_keys(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, NegotiationError> {
        // SessionType decides which keys are irrelevant, whatever order they come in.
        for (k, v) in pairs {
            if k == "SessionType" {
                self.params.session_type = match v.as_str() {
                    "Normal" => SessionType::Normal,
                    "Discovery" => SessionType::Discovery,
                    other => return Err(NegotiationError::SessionType(other.to_string())),
                };
            }
        }
        let discovery = self.params.session_type == SessionType::Discovery;
        let mut out = Vec::new();
        for (k, v) in pairs {
            let key = k.as_str();
            if key == "AuthMethod" || key.starts_with("CHAP_") || key == "SessionType" {
                continue;
            }
            if discovery && DISCOVERY_IRRELEVANT.contains(&key) {
                out.push((k.clone(), "Irrelevant".into()));
                continue;
            }
            if let Some(answer) = self.one_key(key, v)? {
                out.push((k.clone(), answer));
            }
        }
        // A target that does not declare MaxRecvDataSegmentLength is assumed to accept
        // only 8 KiB, so we declare ours once, in the operational stage's first answer.
        if !self.declared_mrdsl && pairs.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength") {
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.limits.max_recv_data_segment_length.to_string(),
            ));
        }
        Ok(out)
    }

    /// Declarations still owed at the end of the operational stage.
    pub fn finish(&mut self) -> Vec<(String, String)> {
        let p = &mut self.params;
        // FirstBurstLength may not exceed MaxBurstLength (RFC 7143 13.14).
        if p.first_burst_length > p.max_burst_length {
            p.first_burst_length = p.max_burst_length;
        }
        if self.declared_mrdsl {
            return Vec::new();
        }
        self.declared_mrdsl = true;
        vec![(
            "MaxRecvDataSegmentLength".into(),
            self.limits.max_recv_data_segment_length.to_string(),
        )]
    }

    fn one_key(&mut self, key: &str, v: &str) -> Result<Option<String>, NegotiationError> {
        let l = &self.limits;
        let p = &mut self.params;
        let reject = || Ok(Some("Reject".to_string()));
        let num_in = |lo: u64, hi: u64| parse_num(v).filter(|n| (lo..=hi).contains(n));
        Ok(match key {
            "HeaderDigest" | "DataDigest" => {
                let mut chosen = None;
                for item in v.split(',') {
                    match item {
                        "None" => {
                            chosen = Some(false);
                            break;
                        }
                        "CRC32C" if l.digests => {
                            chosen = Some(true);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(c) = chosen else {
                    return Err(NegotiationError::NoCommonValue(if key == "HeaderDigest" {
                        "HeaderDigest"
                    } else {
                        "DataDigest"
                    }));
                };
                if key == "HeaderDigest" {
                    p.header_digest = c;
                } else {
                    p.data_digest = c;
                }
                Some(if c { "CRC32C" } else { "None" }.to_string())
            }
            "MaxConnections" => match num_in(1, 65535) {
                // We run one connection per session (no MC/S): min(offer, 1).
                Some(_) => {
                    p.max_connections = 1;
                    Some("1".into())
                }
                None => return reject(),
            },
            "InitiatorName" => {
                p.initiator_name = Some(v.to_string());
                None
            }
            "InitiatorAlias" => {
                p.initiator_alias = Some(v.to_string());
                None
            }
            "TargetName" => {
                p.target_name = Some(v.to_string());
                None
            }
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                return Err(NegotiationError::TargetOnlyKey(key.to_string()))
            }
            "InitialR2T" => match parse_bool(v) {
                Some(b) => {
                    p.initial_r2t = b || l.initial_r2t;
                    Some(yes_no(p.initial_r2t))
                }
                None => return reject(),
            },
            "ImmediateData" => match parse_bool(v) {
                Some(b) => {
                    p.immediate_data = b && l.immediate_data;
                    Some(yes_no(p.immediate_data))
                }
                None => return reject(),
            },
            "MaxRecvDataSegmentLength" => match num_in(512, 0x00ff_ffff) {
                Some(n) => {
                    p.initiator_max_recv_dsl = n as u32;
                    None
                }
                None => return reject(),
            },
            "MaxBurstLength" => match num_in(512, 0x00ff_ffff) {
                Some(n) => {
                    p.max_burst_length = (n as u32).min(l.max_burst_length);
                    Some(p.max_burst_length.to_string())
                }
                None => return reject(),
            },
            "FirstBurstLength" => match num_in(512, 0x00ff_ffff) {
                Some(n) => {
                    p.first_burst_length = (n as u32).min(l.first_burst_length);
                    Some(p.first_burst_length.to_string())
                }
                None => return reject(),
            },
            "DefaultTime2Wait" => match num_in(0, 3600) {
                Some(n) => {
                    p.default_time2wait = (n as u16).max(l.default_time2wait);
                    Some(p.default_time2wait.to_string())
                }
                None => return reject(),
            },
            "DefaultTime2Retain" => match num_in(0, 3600) {
                Some(n) => {
                    p.default_time2retain = (n as u16).min(l.default_time2retain);
                    Some(p.default_time2retain.to_string())
                }
                None => return reject(),
            },
            "MaxOutstandingR2T" => match num_in(1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u16).min(l.max_outstanding_r2t);
                    Some(p.max_outstanding_r2t.to_string())
                }
                None => return reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                // OR with our Yes: we only accept data in order.
                Some(_) => {
                    if key == "DataPDUInOrder" {
                        p.data_pdu_in_order = true;
                    } else {
                        p.data_sequence_in_order = true;
                    }
                    Some("Yes".into())
                }
                None => return reject(),
            },
            "ErrorRecoveryLevel" => match num_in(0, 2) {
                Some(_) => {
                    p.error_recovery_level = 0;
                    Some("0".into())
                }
                None => return reject(),
            },
            // Markers are gone from RFC 7143; old initiators still offer "No", which we
            // accept (AND with our No).
            "IFMarker" | "OFMarker" => Some("No".into()),
            "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".into()),
            // iSER-only keys: not an iSER target.
            "RDMAExtensions" => Some("No".into()),
            _ => Some("NotUnderstood".into()),
        })
    }

    /// Answers the keys of a full-feature-phase Text Request other than SendTargets.
    pub fn text_keys(&mut self, pairs: &[(String, String)]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                continue;
            }
            if LOGIN_ONLY.contains(&k.as_str()) {
                out.push((k.clone(), "Reject".into()));
                continue;
            }
            match self.one_key(k, v) {
                Ok(Some(a)) => out.push((k.clone(), a)),
                Ok(None) => {}
                Err(_) => out.push((k.clone(), "Reject".into())),
            }
        }
        out
    }
}

/// Picks the authentication method from the initiator's list: the first one we accept.
/// With CHAP configured only CHAP is acceptable; without, only None.
pub fn select_auth_method(offer: &str, chap_configured: bool) -> Option<&'static str> {
    offer.split(',').find_map(|m| match m {
        "CHAP" if chap_configured => Some("CHAP"),
        "None" if !chap_configured => Some("None"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn answer<'a>(out: &'a [(String, String)], k: &str) -> Option<&'a str> {
        out.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn text_parses_and_encodes() {
        let raw = b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0";
        let p = parse(raw).expect("parse");
        assert_eq!(p, kv(&[("InitiatorName", "iqn.x"), ("SessionType", "Normal")]));
        assert_eq!(&encode(&p)[..], &raw[..raw.len() - 2]);
        assert!(matches!(parse(b"NoEquals\0"), Err(TextError::NoEquals(_))));
        assert!(matches!(parse(b"bad key=1\0"), Err(TextError::BadKey(_))));
        let long = format!("K={}\0", "a".repeat(MAX_VALUE_LEN + 1));
        assert!(matches!(parse(long.as_bytes()), Err(TextError::ValueTooLong { .. })));
        assert!(matches!(parse(&[0xff, b'=', b'1']), Err(TextError::NotUtf8)));
    }

    #[test]
    fn continued_text_is_gathered_and_bounded() {
        let mut a = Accumulator::default();
        assert_eq!(a.push(b"Initiator", true), Ok(None));
        assert_eq!(a.push(b"Name=iqn.y\0", false), Ok(Some(Bytes::from_static(b"InitiatorName=iqn.y\0"))));
        let big = vec![b'a'; 40_000];
        assert_eq!(a.push(&big, true), Ok(None));
        assert!(a.push(&big, true).is_err());
        let chunks = chunks(&Bytes::from(vec![1u8; 10]), 4);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![4, 4, 2]);
    }

    #[test]
    fn operational_keys_follow_their_rules() {
        let mut n = Negotiator::new(TargetLimits::default());
        let out = n
            .login_keys(&kv(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None,CRC32C"),
                ("MaxConnections", "4"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "0x100"), // below the minimum of 512
                ("DefaultTime2Wait", "0"),
                ("DefaultTime2Retain", "20"),
                ("MaxOutstandingR2T", "1"),
                ("DataPDUInOrder", "No"),
                ("DataSequenceInOrder", "Yes"),
                ("ErrorRecoveryLevel", "2"),
                ("X-com.example.Foo", "bar"),
                ("Unheard", "1"),
                ("IFMarker", "No"),
            ]))
            .expect("negotiate");
        assert_eq!(answer(&out, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(answer(&out, "DataDigest"), Some("None"));
        assert_eq!(answer(&out, "MaxConnections"), Some("1"));
        assert_eq!(answer(&out, "InitialR2T"), Some("No"));
        assert_eq!(answer(&out, "ImmediateData"), Some("Yes"));
        assert_eq!(answer(&out, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(answer(&out, "MaxBurstLength"), Some("1048576"));
        assert_eq!(answer(&out, "FirstBurstLength"), Some("Reject"));
        assert_eq!(answer(&out, "DefaultTime2Wait"), Some("2"));
        assert_eq!(answer(&out, "DefaultTime2Retain"), Some("0"));
        assert_eq!(answer(&out, "MaxOutstandingR2T"), Some("1"));
        assert_eq!(answer(&out, "DataPDUInOrder"), Some("Yes"));
        assert_eq!(answer(&out, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(answer(&out, "X-com.example.Foo"), Some("NotUnderstood"));
        assert_eq!(answer(&out, "Unheard"), Some("NotUnderstood"));
        assert_eq!(answer(&out, "IFMarker"), Some("No"));
        let p = &n.params;
        assert!(p.header_digest && !p.data_digest && !p.initial_r2t && p.immediate_data);
        assert_eq!(p.initiator_max_recv_dsl, 65536);
        assert_eq!(p.target_max_recv_dsl, 262_144);
        assert_eq!(p.first_burst_length, 65536, "rejected offer keeps the default");
        assert!(n.finish().is_empty(), "MaxRecvDataSegmentLength already declared");
    }

    #[test]
    fn boolean_and_or_rules_with_a_strict_target() {
        let limits = TargetLimits { initial_r2t: true, immediate_data: false, ..Default::default() };
        let mut n = Negotiator::new(limits);
        let out = n.login_keys(&kv(&[("InitialR2T", "No"), ("ImmediateData", "Yes"), ("ImmediateData2", "x")]));
        let out = out.expect("negotiate");
        assert_eq!(answer(&out, "InitialR2T"), Some("Yes"));
        assert_eq!(answer(&out, "ImmediateData"), Some("No"));
        assert_eq!(n.login_keys(&kv(&[("InitialR2T", "maybe")])).expect("neg")[0].1, "Reject");
    }

    #[test]
    fn digests_without_common_value_fail_and_declarations_are_recorded() {
        let mut n = Negotiator::new(TargetLimits { digests: false, ..Default::default() });
        assert_eq!(
            n.login_keys(&kv(&[("HeaderDigest", "CRC32C")])),
            Err(NegotiationError::NoCommonValue("HeaderDigest"))
        );
        let out = n
            .login_keys(&kv(&[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t"), ("SessionType", "Normal")]))
            .expect("neg");
        assert!(out.is_empty(), "declarations get no answer: {out:?}");
        assert_eq!(n.params.initiator_name.as_deref(), Some("iqn.i"));
        assert_eq!(n.params.target_name.as_deref(), Some("iqn.t"));
        assert_eq!(n.finish(), kv(&[("MaxRecvDataSegmentLength", "262144")]));
        assert!(matches!(n.login_keys(&kv(&[("SessionType", "Weird")])), Err(NegotiationError::SessionType(_))));
        assert!(matches!(
            n.login_keys(&kv(&[("TargetAddress", "1.2.3.4")])),
            Err(NegotiationError::TargetOnlyKey(_))
        ));
    }

    #[test]
    fn discovery_sessions_answer_irrelevant_and_ffp_rejects_login_keys() {
        let mut n = Negotiator::new(TargetLimits::default());
        let out = n
            .login_keys(&kv(&[("MaxBurstLength", "1000"), ("SessionType", "Discovery"), ("HeaderDigest", "None")]))
            .expect("neg");
        assert_eq!(answer(&out, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(answer(&out, "HeaderDigest"), Some("None"));
        assert_eq!(n.params.session_type, SessionType::Discovery);
        let out = n.text_keys(&kv(&[("SendTargets", "All"), ("InitialR2T", "Yes"), ("X-y", "1"), ("MaxRecvDataSegmentLength", "4096")]));
        assert_eq!(out, kv(&[("InitialR2T", "Reject"), ("X-y", "NotUnderstood")]));
        assert_eq!(n.params.initiator_max_recv_dsl, 4096);
    }

    #[test]
    fn auth_method_selection() {
        assert_eq!(select_auth_method("CHAP,None", true), Some("CHAP"));
        assert_eq!(select_auth_method("None,CHAP", true), Some("CHAP"));
        assert_eq!(select_auth_method("None", true), None);
        assert_eq!(select_auth_method("CHAP,None", false), Some("None"));
        assert_eq!(select_auth_method("SRP,KRB5", false), None);
    }
}
