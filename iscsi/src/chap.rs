//! CHAP authentication of initiators (RFC 1994 as profiled by RFC 7143 12.1.3), MD5 only
//! (CHAP_A=5), one-way and mutual.
//!
//! The target issues a random challenge, checks the initiator's response in constant time,
//! and, when the initiator challenges back (mutual CHAP), answers with the target's own
//! secret, refusing a challenge equal to ours (the reflection attack RFC 7143 warns about).

use md5::{Digest, Md5};
use rand::RngCore;

use crate::lu::Chap;

/// CHAP algorithm identifier of MD5 (RFC 1994 / IANA PPP authentication algorithms).
pub const CHAP_MD5: u8 = 5;
/// Length of our challenges; RFC 7143 asks for at least 16 bytes.
pub const CHALLENGE_LEN: usize = 32;
/// Longest binary value accepted (challenges, responses).
const MAX_BINARY: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("initiator offered no CHAP algorithm we support ({0})")]
    NoAlgorithm(String),
    #[error("missing key {0}")]
    Missing(&'static str),
    #[error("bad encoding of {0}")]
    Encoding(&'static str),
    #[error("unknown CHAP user {0:?}")]
    WrongUser(String),
    #[error("CHAP response does not match")]
    WrongResponse,
    #[error("initiator reflected our challenge back")]
    Reflected,
    #[error("initiator asked for mutual CHAP but the target has no mutual secret")]
    NoMutualSecret,
    #[error("mutual challenge too short ({0} bytes)")]
    ShortChallenge(usize),
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64 (RFC 7143 6.1, binary-value).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        // Digits only: `from_str_radix` alone would also take a sign ("0x+1+2").
        if h.is_empty() || h.len() > 2 * MAX_BINARY || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        // An odd number of digits means an implied leading zero nibble.
        let padded = if h.len() % 2 == 1 { format!("0{h}") } else { h.to_string() };
        let mut out = Vec::with_capacity(padded.len() / 2);
        for pair in padded.as_bytes().chunks(2) {
            let s = std::str::from_utf8(pair).ok()?;
            out.push(u8::from_str_radix(s, 16).ok()?);
        }
        Some(out)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        if b.is_empty() || b.len() > 2 * MAX_BINARY {
            return None;
        }
        base64_decode(b)
    } else {
        None
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=');
    let pad = s.len() - body.len();
    // A lone final character carries 6 of a byte's 8 bits: no encoder produces it, and
    // padding, when present, must complete the last quantum.
    if pad > 2 || body.len() % 4 == 1 || (pad > 0 && !(body.len() + pad).is_multiple_of(4)) {
        return None;
    }
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// MD5(identifier || secret || challenge), the CHAP response (RFC 1994 section 4.1).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Equality that takes the same time wherever the first difference is, so response
/// checks leak nothing about the expected value.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Picks MD5 from the initiator's CHAP_A list.
pub fn select_algorithm(list: &str) -> Result<u8, ChapError> {
    if list.split(',').any(|a| a.trim().parse::<u8>().ok() == Some(CHAP_MD5)) {
        Ok(CHAP_MD5)
    } else {
        Err(ChapError::NoAlgorithm(list.chars().take(64).collect()))
    }
}

/// The challenge we issued on one login.
#[derive(Clone, Debug)]
pub struct Challenge {
    pub id: u8,
    pub value: Vec<u8>,
}

impl Challenge {
    pub fn random() -> Self {
        let mut rng = rand::rng();
        let mut value = vec![0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut value);
        Self { id: (rng.next_u32() & 0xff) as u8, value }
    }

    /// Keys sent with the challenge.
    pub fn keys(&self) -> Vec<(String, String)> {
        vec![
            ("CHAP_A".into(), CHAP_MD5.to_string()),
            ("CHAP_I".into(), self.id.to_string()),
            ("CHAP_C".into(), encode_hex(&self.value)),
        ]
    }

    /// Checks the initiator's CHAP_N/CHAP_R and, for mutual CHAP, computes our answer to
    /// its CHAP_I/CHAP_C (`pairs`: the keys of the login request).
    pub fn verify(&self, chap: &Chap, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, ChapError> {
        let get = |k: &str| pairs.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        let name = get("CHAP_N").ok_or(ChapError::Missing("CHAP_N"))?;
        let r = get("CHAP_R").ok_or(ChapError::Missing("CHAP_R"))?;
        let r = decode_binary(r).ok_or(ChapError::Encoding("CHAP_R"))?;
        let expected = response(self.id, chap.secret.as_bytes(), &self.value);
        // Compare the response before the user name so a wrong user and a wrong secret
        // take the same path and time.
        let ok_r = constant_time_eq(&r, &expected);
        let ok_n = constant_time_eq(name.as_bytes(), chap.user.as_bytes());
        if !ok_n {
            return Err(ChapError::WrongUser(name.chars().take(64).collect()));
        }
        if !ok_r {
            return Err(ChapError::WrongResponse);
        }
        match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => Ok(Vec::new()),
            (Some(i), Some(c)) => {
                let id: u8 = i.parse().map_err(|_| ChapError::Encoding("CHAP_I"))?;
                let c = decode_binary(c).ok_or(ChapError::Encoding("CHAP_C"))?;
                if c.len() < 16 {
                    return Err(ChapError::ShortChallenge(c.len()));
                }
                if constant_time_eq(&c, &self.value) {
                    return Err(ChapError::Reflected);
                }
                let (user, secret) = chap.mutual.as_ref().ok_or(ChapError::NoMutualSecret)?;
                Ok(vec![
                    ("CHAP_N".into(), user.clone()),
                    ("CHAP_R".into(), encode_hex(&response(id, secret.as_bytes(), &c))),
                ])
            }
            (None, Some(_)) => Err(ChapError::Missing("CHAP_I")),
            (Some(_), None) => Err(ChapError::Missing("CHAP_C")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chap(mutual: bool) -> Chap {
        Chap {
            user: "alice".into(),
            secret: "alice-secret-12".into(),
            mutual: mutual.then(|| ("target".into(), "target-secret-1".into())),
        }
    }

    fn lookup(m: &[(&str, String)]) -> Vec<(String, String)> {
        m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn md5_response_matches_a_known_vector() {
        // MD5(0x01 || "secret" || 0x00..0x0f), computed independently with Python's hashlib.
        let ch: Vec<u8> = (0..16).collect();
        assert_eq!(encode_hex(&response(1, b"secret", &ch)), "0x740e86463bda3a4d7017d6e0fba0699d");
    }

    #[test]
    fn binary_values_decode_in_hex_and_base64() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0bSGVsbG8="), Some(b"Hello".to_vec()));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0b!!"), None);
    }

    #[test]
    fn malformed_binary_values_are_refused() {
        // Found by the `login_keys` fuzz target: a base64 value with a dangling character
        // decoded (its 6 bits silently dropped).
        assert_eq!(decode_binary("0bAAECA"), None);
        assert_eq!(decode_binary("0bAA="), None, "padding that does not complete a quantum");
        assert_eq!(decode_binary("0bAAE="), Some(vec![0, 1]));
        assert_eq!(decode_binary("0bAAE"), Some(vec![0, 1]), "padding may be left out");
        // Signs are not hex digits, though `u8::from_str_radix` accepts them.
        assert_eq!(decode_binary("0x+1+2"), None);
        assert_eq!(decode_binary("0x+f"), None);
        assert_eq!(decode_binary("0x0é"), None);
    }

    #[test]
    fn one_way_chap_accepts_the_right_secret_only() {
        let c = Challenge::random();
        assert!(c.value.len() >= 16);
        let good = encode_hex(&response(c.id, b"alice-secret-12", &c.value));
        let m = lookup(&[("CHAP_N", "alice".to_string()), ("CHAP_R", good.clone())]);
        assert_eq!(c.verify(&chap(false), &m), Ok(vec![]));
        let bad = encode_hex(&response(c.id, b"wrong-secret-12", &c.value));
        let m = lookup(&[("CHAP_N", "alice".to_string()), ("CHAP_R", bad)]);
        assert_eq!(c.verify(&chap(false), &m), Err(ChapError::WrongResponse));
        let m = lookup(&[("CHAP_N", "mallory".to_string()), ("CHAP_R", good)]);
        assert!(matches!(c.verify(&chap(false), &m), Err(ChapError::WrongUser(_))));
        let m = lookup(&[("CHAP_N", "alice".to_string())]);
        assert_eq!(c.verify(&chap(false), &m), Err(ChapError::Missing("CHAP_R")));
    }

    #[test]
    fn mutual_chap_answers_with_the_target_secret_and_refuses_reflection() {
        let c = Challenge::random();
        let r = encode_hex(&response(c.id, b"alice-secret-12", &c.value));
        let theirs: Vec<u8> = (100..132).collect();
        let m = lookup(&[
            ("CHAP_N", "alice".to_string()),
            ("CHAP_R", r.clone()),
            ("CHAP_I", "7".to_string()),
            ("CHAP_C", encode_hex(&theirs)),
        ]);
        let out = c.verify(&chap(true), &m).expect("mutual");
        assert_eq!(out[0], ("CHAP_N".to_string(), "target".to_string()));
        assert_eq!(out[1].1, encode_hex(&response(7, b"target-secret-1", &theirs)));
        // Without a mutual secret configured the login must fail.
        assert_eq!(c.verify(&chap(false), &m), Err(ChapError::NoMutualSecret));
        // Reflection: the initiator sends our own challenge to make us compute the answer.
        let m = lookup(&[
            ("CHAP_N", "alice".to_string()),
            ("CHAP_R", r),
            ("CHAP_I", c.id.to_string()),
            ("CHAP_C", encode_hex(&c.value)),
        ]);
        assert_eq!(c.verify(&chap(true), &m), Err(ChapError::Reflected));
    }

    #[test]
    fn algorithm_selection_requires_md5() {
        assert_eq!(select_algorithm("7,5"), Ok(5));
        assert!(select_algorithm("6,7").is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
