//! Bucket policies: the one way a bucket is opened to anonymous requests or to other
//! accounts (ACLs are off, as on buckets AWS creates since 2023: "bucket owner enforced").
//!
//! A policy is the JSON document S3 takes (`PutBucketPolicy`), of which we evaluate this
//! part: statements with `Effect` Allow or Deny, `Principal` `"*"` (everyone, anonymous
//! included) or `{"AWS": …}` naming account ids (or `arn:aws:iam::<id>:root`), `Action`
//! (`s3:…`, with `*` and `?` wildcards, case-insensitive) and `Resource`
//! (`arn:aws:s3:::<bucket>` and `arn:aws:s3:::<bucket>/<key pattern>`). What we cannot
//! evaluate (`Condition`, `NotPrincipal`, `NotAction`, `NotResource`, other principal
//! kinds) is refused when the policy is put (501), never ignored: ignoring a condition
//! would grant more than its author meant.
//!
//! Evaluation is IAM's: an explicit Deny wins, then an Allow; without either only the
//! bucket's owner may act. The owner can always read, replace and delete the policy, so a
//! policy cannot lock the owner out for good.

use serde_json::Value;

/// Largest policy S3 accepts (bytes).
pub const MAX_POLICY_SIZE: usize = 20 << 10;

/// Why a policy was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Not a valid policy for this bucket (S3 `MalformedPolicy`, 400).
    #[error("{0}")]
    Malformed(String),
    /// Valid, but uses what we do not evaluate (S3 `NotImplemented`, 501).
    #[error("{0}")]
    Unsupported(String),
}

/// Whom a statement is about.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Principals {
    /// `"*"`: every caller, signed or not.
    Everyone,
    /// These account ids.
    Accounts(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Statement {
    allow: bool,
    principals: Principals,
    /// Lowercased patterns (`s3:getobject`, `s3:*`, `*`).
    actions: Vec<String>,
    /// Patterns over `arn:aws:s3:::…`.
    resources: Vec<String>,
}

/// A parsed bucket policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    statements: Vec<Statement>,
}

/// What a policy says of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Deny,
    Allow,
    /// No statement applies: the owner may act, nobody else.
    Silent,
}

/// The ARN of a bucket (`key` None) or of an object.
pub fn resource(bucket: &str, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("arn:aws:s3:::{bucket}/{k}"),
        None => format!("arn:aws:s3:::{bucket}"),
    }
}

fn malformed(msg: impl Into<String>) -> PolicyError {
    PolicyError::Malformed(msg.into())
}

/// A string or an array of strings (IAM's usual shape), each checked by `item`.
fn strings(v: &Value, what: &str) -> Result<Vec<String>, PolicyError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(|| malformed(format!("{what} must be strings"))))
            .collect(),
        _ => Err(malformed(format!("{what} must be a string or a non-empty array of strings"))),
    }
}

/// `"123"`, `"arn:aws:iam::123:root"` → `123`.
fn account_of(principal: &str) -> Result<String, PolicyError> {
    let id = match principal.strip_prefix("arn:aws:iam::") {
        Some(rest) => rest
            .strip_suffix(":root")
            .ok_or_else(|| PolicyError::Unsupported(format!("principal {principal:?}: only whole accounts (…:root) can be named")))?,
        None => principal,
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(malformed(format!("Invalid principal in policy: {principal:?}")));
    }
    Ok(id.to_owned())
}

fn principals(v: &Value) -> Result<Principals, PolicyError> {
    match v {
        Value::String(s) if s == "*" => Ok(Principals::Everyone),
        Value::Object(map) => {
            let mut accounts = Vec::new();
            for (kind, who) in map {
                if kind != "AWS" {
                    return Err(PolicyError::Unsupported(format!("principals of kind {kind:?} are not supported; use \"AWS\"")));
                }
                for p in strings(who, "Principal.AWS")? {
                    if p == "*" {
                        return Ok(Principals::Everyone);
                    }
                    accounts.push(account_of(&p)?);
                }
            }
            if accounts.is_empty() {
                return Err(malformed("Invalid principal in policy: no principal named"));
            }
            Ok(Principals::Accounts(accounts))
        }
        _ => Err(malformed("Invalid principal in policy")),
    }
}

fn statement(v: &Value, bucket: &str) -> Result<Statement, PolicyError> {
    let Value::Object(map) = v else {
        return Err(malformed("each Statement must be an object"));
    };
    for key in map.keys() {
        match key.as_str() {
            "Sid" | "Effect" | "Principal" | "Action" | "Resource" => {}
            "Condition" | "NotPrincipal" | "NotAction" | "NotResource" => {
                return Err(PolicyError::Unsupported(format!("{key} in bucket policies is not supported")))
            }
            other => return Err(malformed(format!("Unknown field {other} in policy statement"))),
        }
    }
    let allow = match map.get("Effect").and_then(Value::as_str) {
        Some("Allow") => true,
        Some("Deny") => false,
        _ => return Err(malformed("Invalid effect: Effect must be \"Allow\" or \"Deny\"")),
    };
    let principals = principals(map.get("Principal").ok_or_else(|| malformed("Missing required field Principal"))?)?;
    let actions = strings(map.get("Action").ok_or_else(|| malformed("Missing required field Action"))?, "Action")?
        .into_iter()
        .map(|a| {
            let a = a.to_ascii_lowercase();
            if a == "*" || a.starts_with("s3:") {
                Ok(a)
            } else {
                Err(malformed(format!("Policy has invalid action: {a:?}")))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let own = resource(bucket, None);
    let resources = strings(map.get("Resource").ok_or_else(|| malformed("Missing required field Resource"))?, "Resource")?;
    for r in &resources {
        // Every resource must be this bucket or objects in it (S3 refuses others).
        let ok = r == &own || r.strip_prefix(own.as_str()).is_some_and(|rest| rest.starts_with('/'));
        if !ok {
            return Err(malformed(format!("Policy has invalid resource: {r:?} is not {own} or an object in it")));
        }
    }
    Ok(Statement { allow, principals, actions, resources })
}

impl Policy {
    /// Parses and checks `text` as a policy of `bucket`.
    pub fn parse(text: &str, bucket: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_SIZE {
            return Err(malformed(format!("Policies must be at most {MAX_POLICY_SIZE} bytes")));
        }
        let doc: Value = serde_json::from_str(text).map_err(|e| malformed(format!("Policies must be valid JSON: {e}")))?;
        let Value::Object(map) = &doc else {
            return Err(malformed("Policies must be a JSON object"));
        };
        for key in map.keys() {
            if !matches!(key.as_str(), "Version" | "Id" | "Statement") {
                return Err(malformed(format!("Unknown field {key} in policy")));
            }
        }
        match map.get("Version").map(|v| v.as_str()) {
            None | Some(Some("2012-10-17" | "2008-10-17")) => {}
            _ => return Err(malformed("The policy Version must be \"2012-10-17\" or \"2008-10-17\"")),
        }
        let statements = match map.get("Statement") {
            Some(Value::Array(items)) if !items.is_empty() => {
                items.iter().map(|s| statement(s, bucket)).collect::<Result<Vec<_>, _>>()?
            }
            Some(s @ Value::Object(_)) => vec![statement(s, bucket)?],
            _ => return Err(malformed("Missing required field Statement")),
        };
        Ok(Policy { statements })
    }

    /// What the policy says of `action` (`s3:GetObject`…) on `resource` by `caller`
    /// (None: anonymous).
    pub fn decide(&self, caller: Option<&str>, action: &str, resource: &str) -> Decision {
        let action = action.to_ascii_lowercase();
        let mut decision = Decision::Silent;
        for s in &self.statements {
            let about_caller = match &s.principals {
                Principals::Everyone => true,
                Principals::Accounts(ids) => caller.is_some_and(|c| ids.iter().any(|id| id == c)),
            };
            if !about_caller
                || !s.actions.iter().any(|p| glob(p, &action))
                || !s.resources.iter().any(|p| glob(p, resource))
            {
                continue;
            }
            if !s.allow {
                return Decision::Deny;
            }
            decision = Decision::Allow;
        }
        decision
    }

    /// Whether it grants anything to everyone (S3's `PolicyStatus.IsPublic`).
    pub fn is_public(&self) -> bool {
        self.statements.iter().any(|s| s.allow && s.principals == Principals::Everyone)
    }
}

/// IAM wildcard matching: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy with backtracking to the last `*`: linear in practice, quadratic at worst.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC_READ: &str = r#"{
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PublicRead",
            "Effect": "Allow",
            "Principal": "*",
            "Action": ["s3:GetObject"],
            "Resource": ["arn:aws:s3:::pub/*"]
        }]
    }"#;

    #[test]
    fn wildcards_match_as_iam_does() {
        assert!(glob("*", ""));
        assert!(glob("s3:get*", "s3:getobject"));
        assert!(glob("arn:aws:s3:::b/*", "arn:aws:s3:::b/a/b/c"));
        assert!(!glob("arn:aws:s3:::b/*", "arn:aws:s3:::b"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("*a*b*", "xxaxxbxx"));
        assert!(!glob("*a*b", "xxaxxbxx"));
        assert!(glob("photos/*.jpg", "photos/é/1.jpg"));
    }

    #[test]
    fn a_public_read_policy_lets_anyone_get_objects_and_nothing_else() {
        let p = Policy::parse(PUBLIC_READ, "pub").expect("valid policy");
        assert!(p.is_public());
        assert_eq!(p.decide(None, "s3:GetObject", &resource("pub", Some("a/b"))), Decision::Allow);
        assert_eq!(p.decide(Some("other"), "s3:getobject", &resource("pub", Some("x"))), Decision::Allow);
        assert_eq!(p.decide(None, "s3:PutObject", &resource("pub", Some("x"))), Decision::Silent);
        assert_eq!(p.decide(None, "s3:ListBucket", &resource("pub", None)), Decision::Silent);
        assert_eq!(p.decide(None, "s3:GetObjectVersion", &resource("pub", Some("x"))), Decision::Silent);
    }

    #[test]
    fn deny_wins_and_accounts_are_matched_by_id() {
        let text = r#"{"Statement": [
            {"Effect": "Allow", "Principal": {"AWS": ["arn:aws:iam::acct1:root", "acct2"]}, "Action": "s3:*", "Resource": ["arn:aws:s3:::b", "arn:aws:s3:::b/*"]},
            {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": "arn:aws:s3:::b/keep/*"}
        ]}"#;
        let p = Policy::parse(text, "b").expect("valid policy");
        assert!(!p.is_public());
        assert_eq!(p.decide(Some("acct1"), "s3:ListBucket", &resource("b", None)), Decision::Allow);
        assert_eq!(p.decide(Some("acct2"), "s3:DeleteObject", &resource("b", Some("x"))), Decision::Allow);
        assert_eq!(p.decide(Some("acct2"), "s3:DeleteObject", &resource("b", Some("keep/x"))), Decision::Deny);
        assert_eq!(p.decide(Some("acct3"), "s3:GetObject", &resource("b", Some("x"))), Decision::Silent);
        assert_eq!(p.decide(None, "s3:GetObject", &resource("b", Some("x"))), Decision::Silent);
    }

    #[test]
    fn what_we_cannot_evaluate_is_refused_not_ignored() {
        let with = |extra: &str| {
            format!(r#"{{"Statement": {{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"{extra}}}}}"#)
        };
        assert!(Policy::parse(&with(""), "b").is_ok());
        for extra in [
            r#", "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}"#,
            r#", "NotAction": "s3:PutObject""#,
            r#", "NotResource": "arn:aws:s3:::b/x""#,
        ] {
            assert!(matches!(Policy::parse(&with(extra), "b"), Err(PolicyError::Unsupported(_))), "{extra}");
        }
        let service = r#"{"Statement": {"Effect": "Allow", "Principal": {"Service": "logging.s3.amazonaws.com"}, "Action": "s3:PutObject", "Resource": "arn:aws:s3:::b/*"}}"#;
        assert!(matches!(Policy::parse(service, "b"), Err(PolicyError::Unsupported(_))));
    }

    #[test]
    fn malformed_policies_are_refused() {
        let cases = [
            "",
            "[]",
            "{}",
            r#"{"Statement": []}"#,
            r#"{"Version": "2020-01-01", "Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}}"#,
            r#"{"Statement": {"Effect": "Maybe", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "ec2:RunInstances", "Resource": "arn:aws:s3:::b/*"}}"#,
            // Another bucket, and a bucket whose name only starts like this one.
            r#"{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::other/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bb/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Principal": "*", "Action": [], "Resource": "arn:aws:s3:::b/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Principal": {"AWS": "bad id!"}, "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}}"#,
            r#"{"Statement": {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*", "Extra": 1}}"#,
        ];
        for text in cases {
            assert!(matches!(Policy::parse(text, "b"), Err(PolicyError::Malformed(_))), "{text}");
        }
        let big = format!(r#"{{"Id": "{}", "Statement": []}}"#, "x".repeat(MAX_POLICY_SIZE));
        assert!(matches!(Policy::parse(&big, "b"), Err(PolicyError::Malformed(_))));
    }
}
