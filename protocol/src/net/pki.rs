//! The archive's certificates: a private CA, the server certificate, and client
//! certificates that name a cluster and a role.
//!
//! A client certificate's subject is `O=walvault, OU=<role>, CN=<cluster>`; the server
//! reads both back from the certificate the TLS handshake verified ([`ClientIdentity`]),
//! never from anything the client says in a request. The server certificate always
//! carries the DNS name [`SERVER_NAME`], which clients verify, so client configs do not
//! depend on how the server's address is spelled.

use std::fmt;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

/// DNS name every server certificate carries and every client verifies.
pub const SERVER_NAME: &str = "archived";

/// What a client certificate allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Write WAL, backups and snapshots of its cluster (and read them back).
    Push,
    /// Read its cluster; write activity snapshots.
    Pull,
    /// Everything, on every cluster.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Push => "push",
            Role::Pull => "pull",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "push" => Ok(Role::Push),
            "pull" => Ok(Role::Pull),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role '{other}': expected push, pull or admin"
            )),
        }
    }
}

/// Who a verified client certificate says the peer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Cluster name (`*` for admin certificates that span clusters).
    pub cluster: String,
    /// Role.
    pub role: Role,
    /// The certificate's serial number, hex (as `openssl x509 -noout -serial` prints
    /// it); empty for an identity archived makes for itself.
    pub serial: String,
}

impl ClientIdentity {
    /// The certificate as the audit trail names it: "ROLE:CLUSTER serial HEX".
    pub fn peer(&self) -> String {
        if self.serial.is_empty() {
            format!("{}:{}", self.role, self.cluster)
        } else {
            format!("{}:{} serial {}", self.role, self.cluster, self.serial)
        }
    }

    /// Whether this identity may touch `cluster` at all.
    pub fn may_access(&self, cluster: &str) -> bool {
        self.role == Role::Admin || self.cluster == cluster
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

fn dn(org_unit: &str, common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "walvault");
    dn.push(DnType::OrganizationalUnitName, org_unit);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Creates a new CA.
pub fn generate_ca() -> Result<PemPair, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn("ca", "walvault archive CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn issue(ca: &PemPair, mut params: CertificateParams) -> Result<PemPair, rcgen::Error> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca.cert_pem)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(PemPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues the server certificate for `names` (DNS names or IP addresses) plus [`SERVER_NAME`].
pub fn issue_server_cert(ca: &PemPair, names: &[String]) -> Result<PemPair, rcgen::Error> {
    let mut all = vec![SERVER_NAME.to_string(), "localhost".to_string()];
    all.extend(names.iter().cloned());
    all.dedup();
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    for n in &all {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name = dn("server", SERVER_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(ca, params)
}

/// Issues a client certificate for `cluster` and `role`.
pub fn issue_client_cert(ca: &PemPair, cluster: &str, role: Role) -> Result<PemPair, rcgen::Error> {
    issue_client_cert_valid(ca, cluster, role, None)
}

/// [`issue_client_cert`] valid for `days` from today (to the day, UTC); `None`: rcgen's
/// default, until 4096.
pub fn issue_client_cert_valid(
    ca: &PemPair,
    cluster: &str,
    role: Role,
    days: Option<u32>,
) -> Result<PemPair, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(&role.to_string(), cluster);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if let Some(days) = days {
        use chrono::Datelike;
        let ymd = |t: chrono::DateTime<chrono::Utc>| {
            rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8)
        };
        let now = chrono::Utc::now();
        params.not_before = ymd(now - chrono::Duration::days(1));
        params.not_after = ymd(now + chrono::Duration::days(i64::from(days)));
    }
    issue(ca, params)
}

/// What identifies an issued client certificate: role, cluster, serial (as
/// [`client_identity`] reads them) and its notAfter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// Who it is for.
    pub identity: ClientIdentity,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
}

/// Reads an issued client certificate (PEM).
pub fn issued_cert(cert_pem: &str) -> Result<IssuedCert, String> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    Ok(IssuedCert {
        identity: client_identity(&der)?,
        not_after: not_after(cert_pem)?,
    })
}

/// When the first certificate of a PEM text stops being valid (its notAfter), Unix
/// seconds.
pub fn not_after(cert_pem: &str) -> Result<i64, String> {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .ok_or("no certificate in the PEM text")?
        .map_err(|e| format!("unreadable PEM: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Reads cluster and role from a verified client certificate (DER).
pub fn client_identity(cert_der: &[u8]) -> Result<ClientIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let cluster =
        first(&mut subject.iter_common_name()).ok_or("client certificate has no CN (cluster)")?;
    let role = first(&mut subject.iter_organizational_unit())
        .ok_or("client certificate has no OU (role)")?;
    let role: Role = role.parse()?;
    // The magnitude, as openssl prints it: DER's sign byte (a leading 0x00) left out.
    let raw = cert.raw_serial();
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let serial = hex::encode_upper(&raw[start..]);
    Ok(ClientIdentity {
        cluster,
        role,
        serial,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_says_when_it_expires() {
        let ca = generate_ca().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let end = not_after(&ca.cert_pem).unwrap();
        assert!(end > now + 365 * 86400, "{end} vs {now}");
        assert!(not_after("no PEM here").is_err());
    }

    #[test]
    fn client_certificates_carry_cluster_and_role() {
        let ca = generate_ca().unwrap();
        let client = issue_client_cert(&ca, "main", Role::Pull).unwrap();
        let der = rustls_pemfile::certs(&mut client.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let id = client_identity(&der).unwrap();
        assert_eq!((id.cluster.as_str(), id.role), ("main", Role::Pull));
        assert!(!id.serial.is_empty(), "{id:?}");
        assert_eq!(id.peer(), format!("pull:main serial {}", id.serial));
        assert!(id.may_access("main"));
        assert!(!id.may_access("other"));
    }

    #[test]
    fn a_client_certificate_can_be_issued_for_a_number_of_days() {
        let ca = generate_ca().unwrap();
        let now = chrono::Utc::now().timestamp();
        let c = issue_client_cert_valid(&ca, "main", Role::Push, Some(10)).unwrap();
        let issued = issued_cert(&c.cert_pem).unwrap();
        assert_eq!(issued.identity.role, Role::Push);
        let left = issued.not_after - now;
        assert!((9 * 86400..=11 * 86400).contains(&left), "{left}");
        let forever = issued_cert(&issue_client_cert(&ca, "main", Role::Pull).unwrap().cert_pem);
        assert!(forever.unwrap().not_after > now + 1000 * 365 * 86400);
    }

    #[test]
    fn roles_parse() {
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }
}
