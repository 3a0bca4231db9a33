//! How the client trusts the server: a pinned certificate fingerprint, a CA
//! file, or nothing at all (insecure). Built on rustls with the `ring`
//! provider.
//!
//! Pinning compares the end-entity certificate's fingerprint and still
//! verifies the handshake signature with that certificate's key, so a server
//! that merely replays the pinned certificate without its private key fails.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::{Error, Result, TlsFailure};

/// The hash a thumbprint was taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThumbprintAlgorithm {
    Sha256,
    /// What older vSphere UIs and `esxcli` show; accepted, not recommended.
    Sha1,
}

impl ThumbprintAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            ThumbprintAlgorithm::Sha256 => "SHA-256",
            ThumbprintAlgorithm::Sha1 => "SHA-1",
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            ThumbprintAlgorithm::Sha256 => &ring::digest::SHA256,
            ThumbprintAlgorithm::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        };
        ring::digest::digest(alg, data).as_ref().to_vec()
    }
}

/// A certificate fingerprint as vSphere and
/// `openssl x509 -noout -fingerprint -sha256` show it: colon-separated hex
/// (`AA:BB:...`), 32 bytes for SHA-256 or 20 for SHA-1. Case does not matter;
/// the colons may be left out.
#[derive(Clone, PartialEq, Eq)]
pub struct Thumbprint {
    algorithm: ThumbprintAlgorithm,
    bytes: Vec<u8>,
}

impl Thumbprint {
    pub fn algorithm(&self) -> ThumbprintAlgorithm {
        self.algorithm
    }

    /// The thumbprint of a DER certificate.
    pub fn of(algorithm: ThumbprintAlgorithm, der: &[u8]) -> Self {
        Thumbprint {
            algorithm,
            bytes: algorithm.digest(der),
        }
    }

    fn matches(&self, der: &[u8]) -> bool {
        self.algorithm.digest(der) == self.bytes
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.bytes.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({} {self})", self.algorithm.name())
    }
}

impl FromStr for Thumbprint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &str| {
            Error::invalid(
                format!("certificate thumbprint {s:?}"),
                format!(
                    "{reason}; expected the SHA-256 fingerprint (32 bytes) or SHA-1 (20 bytes) as \
                     colon-separated hex, as `openssl x509 -noout -fingerprint -sha256` prints it"
                ),
            )
        };
        let s_trim = s.trim();
        // `openssl` prints `sha256 Fingerprint=AA:BB...`: accept that whole line too.
        let hex_part = s_trim.rsplit_once('=').map_or(s_trim, |(_, h)| h);
        let groups: Vec<&str> = if hex_part.contains(':') {
            hex_part.split(':').collect()
        } else {
            if hex_part.len() % 2 != 0 || !hex_part.is_ascii() {
                return Err(invalid("an odd number of hex digits"));
            }
            (0..hex_part.len()).step_by(2).map(|i| &hex_part[i..i + 2]).collect()
        };
        let mut bytes = Vec::with_capacity(groups.len());
        for g in groups {
            if g.len() != 2 || !g.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(&format!("{g:?} is not two hex digits")));
            }
            bytes.push(u8::from_str_radix(g, 16).map_err(|_| invalid(&format!("{g:?} is not hex")))?);
        }
        let algorithm = match bytes.len() {
            32 => ThumbprintAlgorithm::Sha256,
            20 => ThumbprintAlgorithm::Sha1,
            n => return Err(invalid(&format!("{n} bytes"))),
        };
        Ok(Thumbprint { algorithm, bytes })
    }
}

/// How to trust the server's certificate.
#[derive(Debug, Clone)]
pub enum TlsTrust {
    /// Accept exactly the certificate with this fingerprint.
    Thumbprint(Thumbprint),
    /// Accept certificates that chain to a CA in this PEM file and name the
    /// host of the URL.
    CaFile(PathBuf),
    /// Accept any certificate. The caller logs a warning.
    Insecure,
}

/// The error a pinning verifier returns, found again by [`classify`] in the
/// source chain of a failed request.
#[derive(Debug)]
struct Mismatch(TlsFailure);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Mismatch {}

/// Pins the end-entity certificate, or (without a pin) accepts any; both
/// verify the handshake signature with the presented certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: Option<Thumbprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if pin.matches(end_entity) => Ok(ServerCertVerified::assertion()),
            Some(pin) => {
                let presented = Thumbprint::of(pin.algorithm, end_entity);
                let failure = TlsFailure::ThumbprintMismatch {
                    algorithm: pin.algorithm.name(),
                    expected: pin.to_string(),
                    presented: presented.to_string(),
                };
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                    Arc::new(Mismatch(failure)),
                ))))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls client configuration for this trust setting.
pub(crate) fn client_config(trust: &TlsTrust) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid("TLS configuration", e.to_string()))?;
    let config = match trust {
        TlsTrust::Thumbprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: Some(pin.clone()),
                provider,
            }))
            .with_no_client_auth(),
        TlsTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier { pin: None, provider }))
            .with_no_client_auth(),
        TlsTrust::CaFile(path) => {
            let what = || format!("CA file {}", path.display());
            let mut roots = RootCertStore::empty();
            let mut count = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| Error::invalid(what(), e.to_string()))? {
                let cert = cert.map_err(|e| Error::invalid(what(), e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::invalid(what(), format!("a certificate in it is unusable: {e}")))?;
                count += 1;
            }
            if count == 0 {
                return Err(Error::invalid(what(), "it holds no PEM certificate"));
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::invalid(what(), e.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
    };
    Ok(config)
}

/// Finds a TLS failure in the source chain of a request error.
pub(crate) fn classify(err: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut hops = 0;
    while let Some(e) = cur {
        if let Some(tls) = rustls_error(e) {
            return Some(tls);
        }
        // An io::Error's source() skips the error it wraps (hyper-rustls
        // wraps rustls' error in two of them): step into it instead.
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
        hops += 1;
        if hops > 32 {
            break;
        }
    }
    None
}

fn rustls_error(e: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let e = e.downcast_ref::<rustls::Error>()?;
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = e {
        if let Some(Mismatch(failure)) = inner.downcast_ref::<Mismatch>() {
            return Some(failure.clone());
        }
    }
    Some(TlsFailure::Other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_thumbprints_as_vsphere_and_openssl_print_them() {
        let sha256 = "54:D9:C9:B0:B2:85:59:71:13:EE:18:50:62:B7:CA:23:BE:13:0C:26:97:62:76:03:B2:DD:12:B2:01:78:50:94";
        let t: Thumbprint = sha256.parse().unwrap();
        assert_eq!(t.algorithm(), ThumbprintAlgorithm::Sha256);
        assert_eq!(t.to_string(), sha256);
        assert_eq!(sha256.to_lowercase().parse::<Thumbprint>().unwrap(), t);
        assert_eq!(sha256.replace(':', "").parse::<Thumbprint>().unwrap(), t);
        assert_eq!(format!("sha256 Fingerprint={sha256}").parse::<Thumbprint>().unwrap(), t);
        let sha1: Thumbprint = "56:2A:7B:7A:0D:C0:8E:0F:70:8E:6E:94:7E:DD:B7:25:34:F2:36:F5"
            .parse()
            .unwrap();
        assert_eq!(sha1.algorithm(), ThumbprintAlgorithm::Sha1);
    }

    #[test]
    fn refuses_malformed_thumbprints_saying_what_is_valid() {
        for bad in [
            "".to_string(),
            "AA:BB".into(),
            "ZZ:".repeat(31) + "ZZ",
            "+A:".repeat(31) + "AA",
            "A:BB".into(),
            "abc".into(),
            "é".into(),
        ]
        .iter()
        .map(|s| s.to_string())
        {
            let err = bad.parse::<Thumbprint>().unwrap_err().to_string();
            assert!(err.contains("colon-separated hex"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn thumbprint_of_matches_ring_digest() {
        let t = Thumbprint::of(ThumbprintAlgorithm::Sha256, b"abc");
        assert_eq!(
            t.to_string(),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
        assert!(t.matches(b"abc"));
        assert!(!t.matches(b"abd"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = client_config(&TlsTrust::CaFile(path)).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        let err = client_config(&TlsTrust::CaFile(dir.path().join("missing.pem"))).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
