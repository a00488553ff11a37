//! Where hub requests may go: the redirect policy (https only, never to this machine or a private
//! network unless it is the configured endpoint) and the name resolver that holds connections to
//! the same rule for the addresses a host name really resolves to (against DNS rebinding).

use reqwest::Url;

/// Most redirects one hub request follows.
pub(super) const MAX_REDIRECTS: usize = 10;

/// Why a redirect of a hub request to `to` is not followed (`None`: it is). A redirect to the
/// configured endpoint's own origin (scheme, host and port: a mirror the admin chose, which may be on
/// the local network) is followed; any other must be `https` to a host that is not an IP address of
/// the machine or a private network — loopback, private (RFC 1918), carrier-grade NAT, link-local,
/// unique-local, unspecified, broadcast or multicast, IPv4-mapped forms included — nor `localhost`,
/// so that a hub (or whoever answers for it) cannot point the supervisor at plain-text URLs or at
/// services inside the network it runs in. Host names are checked here as written; where they
/// resolve to is checked when they are connected to ([`PublicOnly`]).
pub(crate) fn redirect_refusal(endpoint: &Url, to: &Url) -> Option<String> {
    if to.scheme() == endpoint.scheme()
        && to.host() == endpoint.host()
        && to.port_or_known_default() == endpoint.port_or_known_default()
    {
        return None;
    }
    if to.scheme() != "https" {
        return Some(format!(
            "refused a redirect to {to}: only https redirects are followed"
        ));
    }
    // The URL parser has normalised the host: IPv4 in dotted decimal, IPv6 in brackets.
    let host = to.host_str().unwrap_or("");
    let internal = match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(std::net::IpAddr::V4(ip)) => !ipv4_is_public(ip),
        Ok(std::net::IpAddr::V6(ip)) => !ipv6_is_public(ip),
        Err(_) => {
            let d = host.trim_end_matches('.').to_ascii_lowercase();
            d.is_empty() || d == "localhost" || d.ends_with(".localhost")
        }
    };
    internal.then(|| {
        format!(
            "refused a redirect to {to}: it points at this machine or a private network address"
        )
    })
}

/// A host name that resolved only to addresses of this machine or a private network ([`PublicOnly`]).
#[derive(Debug)]
pub(crate) struct PrivateAddress {
    host: String,
}

impl std::fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused to connect to {}: it resolves only to addresses of this machine or a private network",
            self.host
        )
    }
}

impl std::error::Error for PrivateAddress {}

/// Whether `e` (or an error it wraps) is a [`PrivateAddress`] refusal: final, never retried.
pub(super) fn refused_address(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<PrivateAddress>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The public addresses among `addrs`, which `host` resolved to; all of them when `exempt` (the
/// configured endpoint's own host: a mirror the admin chose may be on the local network).
///
/// Errors: [`PrivateAddress`] when none is public (see [`redirect_refusal`] for what counts as
/// private).
pub(crate) fn public_addrs(
    host: &str,
    addrs: Vec<std::net::SocketAddr>,
    exempt: bool,
) -> Result<Vec<std::net::SocketAddr>, PrivateAddress> {
    if exempt {
        return Ok(addrs);
    }
    let kept: Vec<_> = addrs
        .into_iter()
        .filter(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => ipv4_is_public(ip),
            std::net::IpAddr::V6(ip) => ipv6_is_public(ip),
        })
        .collect();
    if kept.is_empty() {
        return Err(PrivateAddress {
            host: host.to_owned(),
        });
    }
    Ok(kept)
}

/// The hub client's name resolver: the system's (`getaddrinfo`, on the blocking pool), keeping only
/// public addresses for every host but the endpoint's own. [`redirect_refusal`] checks a redirect's
/// host as written; this checks where a name really leads, so a public-looking name whose DNS answer is
/// `127.0.0.1` or `10.0.0.5` (DNS rebinding) cannot point a download at the machine or its network.
/// IP-address URLs are not resolved (reqwest connects to them directly) and are checked by
/// [`redirect_refusal`] alone.
pub(crate) struct PublicOnly {
    /// The configured endpoint's host name, lower case.
    pub(crate) endpoint_host: Option<String>,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let exempt = self.endpoint_host.as_deref() == Some(host.as_str());
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = public_addrs(&host, addrs, exempt)?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn ipv4_is_public(ip: std::net::Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        // 100.64.0.0/10, carrier-grade NAT (RFC 6598)
        || (a == 100 && (b & 0xc0) == 64))
}

fn ipv6_is_public(ip: std::net::Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return ipv4_is_public(v4);
    }
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::super::HubError;
    use super::super::api::{Attempt, Hub, HubConfig, error_chain};
    use super::*;

    #[test]
    fn only_public_addresses_are_kept_unless_the_host_is_the_endpoint() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let mixed = vec![a("10.0.0.5:0"), a("93.184.216.34:0"), a("[::1]:0")];
        assert_eq!(
            public_addrs("cdn.example", mixed.clone(), false).unwrap(),
            vec![a("93.184.216.34:0")]
        );
        assert_eq!(public_addrs("mirror.lan", mixed, true).unwrap().len(), 3);
        for private in [
            "127.0.0.1:0",
            "192.168.1.9:0",
            "100.64.1.1:0",
            "169.254.1.1:0",
            "[fd00::1]:0",
            "[::ffff:10.1.2.3]:0",
        ] {
            let e = public_addrs("rebind.example", vec![a(private)], false).unwrap_err();
            assert!(
                e.to_string().contains("rebind.example")
                    && e.to_string().contains("private network"),
                "{private}: {e}"
            );
        }
    }

    /// The hub client's resolver really resolves: `localhost` (from /etc/hosts, a loopback address) is
    /// refused for any host but the endpoint's, and the refusal is final (not retried).
    #[tokio::test]
    async fn the_hub_client_refuses_a_name_that_resolves_to_this_machine() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        let dir = std::env::temp_dir();
        // Endpoint given by IP: `localhost` is another host, resolved and refused.
        let hub = Hub::new(HubConfig::new(
            format!("http://127.0.0.1:{port}"),
            None,
            dir.clone(),
        ))
        .unwrap();
        let url = Url::parse(&format!("http://localhost:{port}/x")).unwrap();
        let e = hub.client.get(url.clone()).send().await.unwrap_err();
        assert!(refused_address(&e), "{}", error_chain(&e));
        assert!(
            error_chain(&e).contains("refused to connect to localhost"),
            "{}",
            error_chain(&e)
        );
        assert!(matches!(
            Attempt::send_failed(&url, &e),
            Attempt::Fatal(HubError::BadResponse { .. })
        ));
        // The endpoint's own host name is exempt (a mirror on the local network).
        let hub = Hub::new(HubConfig::new(
            format!("http://localhost:{port}"),
            None,
            dir,
        ))
        .unwrap();
        let r = hub.client.get(url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");
    }

    #[test]
    fn redirects_go_only_to_public_https_hosts_or_the_endpoint_itself() {
        let hub = Url::parse("https://huggingface.co").unwrap();
        let refusal = |to: &str| redirect_refusal(&hub, &Url::parse(to).unwrap());
        for ok in [
            "https://cdn-lfs.huggingface.co/repos/x/y?sig=1",
            "https://cas-bridge.xethub.hf.co/x",
            "https://8.8.8.8/x",
            "https://[2606:4700::1111]/x",
            "https://huggingface.co:443/other/path",
        ] {
            assert_eq!(refusal(ok), None, "{ok}");
        }
        for bad in [
            "http://cdn-lfs.huggingface.co/x",
            "http://8.8.8.8/x",
            "ftp://example.com/x",
        ] {
            let why = refusal(bad).unwrap_or_else(|| panic!("{bad} was allowed"));
            assert!(why.contains("only https"), "{bad}: {why}");
        }
        for bad in [
            "https://10.0.0.5/x",
            "https://10.255.255.255/x",
            "https://172.16.0.1/x",
            "https://192.168.1.1/x",
            "https://127.0.0.1/x",
            "https://127.1/x",
            "https://2130706433/x",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://255.255.255.255/x",
            "https://224.0.0.1/x",
            "https://[::1]/x",
            "https://[::]/x",
            "https://[fc00::1]/x",
            "https://[fd12:3456::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://localhost/x",
            "https://LOCALHOST./x",
            "https://api.localhost/x",
        ] {
            let why = refusal(bad).unwrap_or_else(|| panic!("{bad} was allowed"));
            assert!(why.contains("private network"), "{bad}: {why}");
        }
        // A mirror the admin configured on the local network: its own origin is followed, even over
        // http; another port or host of that network is not.
        let mirror = Url::parse("http://127.0.0.1:9000").unwrap();
        let to = |u: &str| redirect_refusal(&mirror, &Url::parse(u).unwrap());
        assert_eq!(to("http://127.0.0.1:9000/cdn/a/b.gguf"), None);
        assert!(to("http://127.0.0.1:9001/cdn/a/b.gguf").is_some());
        assert!(to("https://127.0.0.1:9000/cdn/a/b.gguf").is_some());
        assert!(to("http://192.168.0.2:9000/x").is_some());
    }
}
