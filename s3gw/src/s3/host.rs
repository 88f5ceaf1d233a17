//! Virtual-hosted-style addressing: `bucket.<domain>` names the bucket for each configured
//! domain; any other host (an IP address, a bare node name) is path-style.

use s3s::S3Result;
use s3s::host::{S3Host, VirtualHost};

#[derive(Debug, Clone)]
pub struct Domains {
    /// Lowercase, without port.
    domains: Vec<String>,
}

impl Domains {
    pub fn new(domains: &[String]) -> Self {
        Domains { domains: domains.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect() }
    }

    /// The bucket named by `host`, if it is a subdomain of one of ours.
    pub fn bucket_of(&self, host: &str) -> Option<String> {
        let name = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().find_map(|d| {
            let bucket = name.strip_suffix(d.as_str())?.strip_suffix('.')?;
            (!bucket.is_empty()).then(|| bucket.to_owned())
        })
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

impl S3Host for Domains {
    fn parse_host_header<'a>(&'a self, host: &'a str) -> S3Result<VirtualHost<'a>> {
        Ok(match self.bucket_of(host) {
            Some(bucket) => VirtualHost::new(host).with_bucket(bucket),
            None => VirtualHost::new(host),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_of_our_domains_name_buckets() {
        let d = Domains::new(&["s3.basalt.local".into(), "localhost".into()]);
        assert_eq!(d.bucket_of("photos.s3.basalt.local"), Some("photos".into()));
        assert_eq!(d.bucket_of("my.dotted.bucket.s3.basalt.local:9000"), Some("my.dotted.bucket".into()));
        assert_eq!(d.bucket_of("Photos.LOCALHOST:8080"), Some("photos".into()));
        assert_eq!(d.bucket_of("s3.basalt.local"), None);
        assert_eq!(d.bucket_of("localhost:8080"), None);
        assert_eq!(d.bucket_of("node1:9000"), None);
        assert_eq!(d.bucket_of("notlocalhost"), None);
        assert_eq!(d.bucket_of("[::1]:9000"), None);
    }
}
