//! TLS for `NBD_OPT_STARTTLS`: the server's X.509 credentials, optional client
//! certificate verification, and a connection stream that is upgraded in place.
//!
//! rustls with the ring provider does the work. A [`TlsConfig`] is built once from PEM
//! files (so a bad file is an error at startup naming it, not at the first client) and
//! shared by every connection.

use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use crate::error::{chain, Error, Result};

/// PEM files larger than this are refused (a certificate chain is a few KiB).
const MAX_PEM_FILE: u64 = 1 << 20;

/// TLS settings of a server: its certificate chain and key, the CA that client
/// certificates must chain to (if any), and whether TLS is required.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: TlsAcceptor,
    required: bool,
    verifies_clients: bool,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("required", &self.required)
            .field("verifies_clients", &self.verifies_clients)
            .finish()
    }
}

impl TlsConfig {
    /// Loads the server's certificate chain (`cert`: PEM, leaf first, then any
    /// intermediates) and private key (`key`: PEM, PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or
    /// Ed25519). With `client_ca` (PEM, one or more CA certificates), every client must
    /// present a certificate that chains to one of them, or its TLS handshake fails.
    /// TLS is optional for clients until [`TlsConfig::required`] is set.
    ///
    /// # Errors
    /// [`Error::Config`] naming the file: unreadable, no certificate or key in it, a key
    /// that does not match the certificate, a CA certificate rustls refuses.
    pub fn from_pem_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(cert)?;
        let key_bytes = read_pem(key)?;
        let private = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| Error::Config(format!("{}: no usable private key: {e}", key.display())))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS protocol versions: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c).map_err(|e| {
                        Error::Config(format!("{}: unusable CA certificate: {e}", ca.display()))
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, private).map_err(|e| {
            Error::Config(format!("{} with {}: {e}", cert.display(), key.display()))
        })?;
        Ok(TlsConfig {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required: false,
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Requires TLS: before `NBD_OPT_STARTTLS`, every option but `NBD_OPT_ABORT` is
    /// answered with `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` closes the
    /// connection (the spec's FORCEDTLS mode). Default: TLS at the client's choice.
    pub fn required(mut self, yes: bool) -> Self {
        self.required = yes;
        self
    }

    /// TLS is required before any option.
    pub fn is_required(&self) -> bool {
        self.required
    }

    /// Clients must present a certificate signed by the configured CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    let read = |path: &Path| -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?
            .take(MAX_PEM_FILE + 1)
            .read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(Error::Config(format!(
            "{}: more than {MAX_PEM_FILE} bytes, not a PEM certificate or key",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The certificates of a PEM file, at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{}: no PEM CERTIFICATE block",
            path.display()
        )));
    }
    Ok(certs)
}

/// A connection's byte stream: plain until `NBD_OPT_STARTTLS`, then TLS for the rest of
/// the connection (there is no way back).
pub(crate) enum Conn<S> {
    /// Before TLS (or a server without TLS).
    Plain(S),
    /// After a successful TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// A failed handshake consumed the stream.
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Runs the TLS handshake on a plain stream. Any bytes the client sent after
    /// `NBD_OPT_STARTTLS` are read by the handshake itself: nothing sent in plain text
    /// can be mistaken for a protected option.
    pub(crate) async fn start_tls(&mut self, config: &TlsConfig) -> Result<()> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Closed) else {
            return Err(Error::Protocol("TLS started twice".into()));
        };
        match config.acceptor.accept(stream).await {
            Ok(tls) => {
                *self = Conn::Tls(Box::new(tls));
                Ok(())
            }
            Err(e) => Err(Error::Tls(chain(&e))),
        }
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection closed after a failed TLS handshake",
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
            Conn::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Closed => Poll::Ready(Ok(())),
        }
    }
}
