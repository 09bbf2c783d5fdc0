//! Fixed newstyle option negotiation: from the greeting to an export in transmission.
//!
//! Every option is answered (unknown ones with `NBD_REP_ERR_UNSUP`, malformed ones with
//! `NBD_REP_ERR_INVALID`); the connection is only dropped when the stream itself is
//! broken (bad magic, unknown client flags, EOF), on an unknown or over-long
//! `NBD_OPT_EXPORT_NAME`, which has no way to report an error, after [`MAX_OPTIONS`]
//! options, and when a TLS handshake fails.
//!
//! With TLS configured, `NBD_OPT_STARTTLS` is acknowledged and the rest of the
//! connection runs over TLS; everything negotiated before it is forgotten (a
//! man in the middle could have injected it in plain text). When TLS is required, every
//! option before it except `NBD_OPT_ABORT` is answered with `NBD_REP_ERR_TLS_REQD`.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{excerpt, Error, Result};
use crate::export::{Export, Exports, Limits};
use crate::tls::{Conn, TlsConfig};
use crate::wire::{self, info, opt, rep, Decoded, Invalid, Reader};

/// The only metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Option data beyond this size is skipped and answered with `NBD_REP_ERR_TOO_BIG`
/// (except for `NBD_OPT_EXPORT_NAME`, which has no reply: the connection is closed).
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Options one client may send before the server gives up on it (`NBD_REP_ERR_POLICY`,
/// then close): real clients send a handful; the spec lets a server end a negotiation
/// it considers a denial of service.
pub const MAX_OPTIONS: usize = 128;

/// The outcome of a successful negotiation.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The chosen export.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// State carried between options.
#[derive(Default)]
struct Session {
    structured: bool,
    /// Export name for which `base:allocation` was selected.
    meta_for: Option<String>,
    /// Where TLS stands on this connection.
    tls: TlsState,
}

/// TLS on one connection, as the option handler sees it.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum TlsState {
    /// The server has no TLS credentials.
    #[default]
    Unavailable,
    /// TLS may be started; options are served without it too.
    Offered,
    /// TLS must be started before any option but `NBD_OPT_ABORT`.
    Required,
    /// TLS is running.
    Active,
}

/// Runs the handshake on `stream`, upgrading it to TLS if the client asks and `tls` is
/// set. `Ok(None)` when the client aborted or listed exports and left.
///
/// # Errors
/// I/O failures, protocol violations that make the stream unusable, a failed TLS
/// handshake.
pub(crate) async fn negotiate<S>(
    stream: &mut Conn<S>,
    exports: &Exports,
    limits: &Limits,
    tls: Option<&TlsConfig>,
) -> Result<Option<Negotiated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&wire::encode_greeting())
        .await
        .map_err(Error::io("sending the greeting"))?;
    stream
        .flush()
        .await
        .map_err(Error::io("sending the greeting"))?;
    let client_flags = match stream.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("reading client flags")(e)),
    };
    let known = wire::CLIENT_FIXED_NEWSTYLE | wire::CLIENT_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(Error::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & wire::CLIENT_NO_ZEROES != 0;
    let tls_state = match tls {
        None => TlsState::Unavailable,
        Some(t) if t.is_required() => TlsState::Required,
        Some(_) => TlsState::Offered,
    };
    let mut session = Session {
        tls: tls_state,
        ..Session::default()
    };
    let mut count = 0usize;
    loop {
        let mut header = [0u8; wire::OPTION_HEADER_LEN];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::Protocol("client closed during negotiation".into()))
            }
            Err(e) => return Err(Error::io("reading an option")(e)),
        }
        let header = match wire::decode_option_header(&header) {
            Ok(Decoded::Done(h, _)) => h,
            Ok(Decoded::Incomplete(n)) => {
                return Err(Error::Protocol(format!("option header needs {n} bytes")))
            }
            Err(Invalid(msg)) => return Err(Error::Protocol(msg)),
        };
        let mut out = Vec::new();
        count += 1;
        if count > MAX_OPTIONS {
            let msg = format!("more than {MAX_OPTIONS} options in one negotiation");
            wire::encode_option_reply(&mut out, header.option, rep::ERR_POLICY, msg.as_bytes());
            // The client may not be reading: the close must not wait for it.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), send(stream, &out)).await;
            return Err(Error::Protocol(msg));
        }
        if header.option == opt::EXPORT_NAME && header.len as usize > wire::MAX_STRING {
            // No reply exists for this option, so the only answer is to hang up.
            return Err(Error::Protocol(format!(
                "NBD_OPT_EXPORT_NAME with a name of {} bytes (at most {})",
                header.len,
                wire::MAX_STRING
            )));
        }
        if header.len > MAX_OPTION_DATA {
            skip(stream, u64::from(header.len)).await?;
            let msg = format!(
                "option data of {} bytes exceeds {MAX_OPTION_DATA}",
                header.len
            );
            let gated = !matches!(header.option, opt::ABORT | opt::STARTTLS);
            let kind = if session.tls == TlsState::Required && gated {
                rep::ERR_TLS_REQD
            } else {
                rep::ERR_TOO_BIG
            };
            wire::encode_option_reply(&mut out, header.option, kind, msg.as_bytes());
            send(stream, &out).await?;
            continue;
        }
        let mut data = vec![0u8; header.len as usize];
        stream
            .read_exact(&mut data)
            .await
            .map_err(Error::io("reading option data"))?;
        let step = handle_option(
            header.option,
            &data,
            exports,
            limits,
            &mut session,
            &mut out,
        );
        match step {
            Step::Continue => send(stream, &out).await?,
            Step::Abort => {
                send(stream, &out).await?;
                return Ok(None);
            }
            Step::Go(export) => {
                send(stream, &out).await?;
                return Ok(Some(finish(export, &session)));
            }
            Step::Refuse(msg) => return Err(Error::Protocol(msg.into())),
            Step::StartTls => {
                send(stream, &out).await?;
                let Some(config) = tls else {
                    return Err(Error::Protocol("STARTTLS without TLS credentials".into()));
                };
                stream.start_tls(config).await?;
                // Nothing negotiated in plain text carries over.
                session = Session {
                    tls: TlsState::Active,
                    ..Session::default()
                };
            }
            Step::ExportName(name) => {
                let Some(export) = exports.find(&name).cloned() else {
                    return Err(Error::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {}",
                        excerpt(&name)
                    )));
                };
                out.extend_from_slice(&export.backend().size().to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(session.structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(stream, &out).await?;
                return Ok(Some(finish(export, &session)));
            }
        }
    }
}

fn finish(export: Arc<Export>, session: &Session) -> Negotiated {
    let base_allocation = session.structured && session.meta_for.as_deref() == Some(export.name());
    Negotiated {
        export,
        structured: session.structured,
        base_allocation,
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) -> Result<()> {
    stream
        .write_all(out)
        .await
        .map_err(Error::io("sending an option reply"))?;
    stream
        .flush()
        .await
        .map_err(Error::io("sending an option reply"))
}

/// Reads and discards `len` bytes.
async fn skip<S: AsyncRead + Unpin>(stream: &mut S, len: u64) -> Result<()> {
    let copied = tokio::io::copy(&mut stream.take(len), &mut tokio::io::sink())
        .await
        .map_err(Error::io("skipping option data"))?;
    if copied != len {
        return Err(Error::Protocol("client closed inside option data".into()));
    }
    Ok(())
}

enum Step {
    Continue,
    Abort,
    Go(Arc<Export>),
    ExportName(String),
    Refuse(&'static str),
    /// The ACK is in `out`: send it, then run the TLS handshake.
    StartTls,
}

/// Handles one option, appending its replies to `out`.
fn handle_option(
    option: u32,
    data: &[u8],
    exports: &Exports,
    limits: &Limits,
    session: &mut Session,
    out: &mut Vec<u8>,
) -> Step {
    let error = |out: &mut Vec<u8>, kind: u32, msg: &str| {
        wire::encode_option_reply(out, option, kind, msg.as_bytes());
    };
    if session.tls == TlsState::Required && !matches!(option, opt::STARTTLS | opt::ABORT) {
        if option == opt::EXPORT_NAME {
            // It cannot be refused with an error: the spec says to hang up.
            return Step::Refuse("NBD_OPT_EXPORT_NAME before STARTTLS on a server requiring TLS");
        }
        error(
            out,
            rep::ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        );
        return Step::Continue;
    }
    match option {
        // NBD_OPT_EXPORT_NAME cannot report an error: a bad name ends the connection.
        opt::EXPORT_NAME => match String::from_utf8(data.to_vec()) {
            Ok(name) => Step::ExportName(name),
            Err(_) => Step::Refuse("NBD_OPT_EXPORT_NAME with a name that is not UTF-8"),
        },
        opt::ABORT => {
            wire::encode_option_reply(out, option, rep::ACK, &[]);
            Step::Abort
        }
        opt::LIST => {
            if !data.is_empty() {
                error(out, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                return Step::Continue;
            }
            for export in exports.iter() {
                let mut d = Vec::new();
                d.extend_from_slice(&(export.name().len() as u32).to_be_bytes());
                d.extend_from_slice(export.name().as_bytes());
                d.extend_from_slice(export.describe().as_bytes());
                wire::encode_option_reply(out, option, rep::SERVER, &d);
            }
            wire::encode_option_reply(out, option, rep::ACK, &[]);
            Step::Continue
        }
        opt::STARTTLS => match session.tls {
            TlsState::Unavailable => {
                error(out, rep::ERR_POLICY, "TLS is not offered by this server");
                Step::Continue
            }
            TlsState::Active => {
                error(out, rep::ERR_INVALID, "TLS is already running");
                Step::Continue
            }
            TlsState::Offered | TlsState::Required if !data.is_empty() => {
                error(out, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                Step::Continue
            }
            TlsState::Offered | TlsState::Required => {
                wire::encode_option_reply(out, option, rep::ACK, &[]);
                Step::StartTls
            }
        },
        opt::EXTENDED_HEADERS => {
            error(out, rep::ERR_UNSUP, "extended headers are not supported");
            Step::Continue
        }
        opt::STRUCTURED_REPLY => {
            if !data.is_empty() {
                error(
                    out,
                    rep::ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            } else {
                session.structured = true;
                wire::encode_option_reply(out, option, rep::ACK, &[]);
            }
            Step::Continue
        }
        opt::INFO | opt::GO => match parse_info(data) {
            Err(Invalid(msg)) => {
                error(out, rep::ERR_INVALID, &msg);
                Step::Continue
            }
            Ok((name, requests)) => match exports.find(&name) {
                None => {
                    error(
                        out,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {}", excerpt(&name)),
                    );
                    Step::Continue
                }
                Some(export) => {
                    encode_info(out, option, export, &requests, limits, session.structured);
                    wire::encode_option_reply(out, option, rep::ACK, &[]);
                    if option == opt::GO {
                        Step::Go(export.clone())
                    } else {
                        Step::Continue
                    }
                }
            },
        },
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            if option == opt::SET_META_CONTEXT {
                // A SET replaces the selection even when it fails (proto.md).
                session.meta_for = None;
            }
            if !session.structured {
                error(out, rep::ERR_INVALID, "negotiate structured replies first");
                return Step::Continue;
            }
            let set = option == opt::SET_META_CONTEXT;
            match parse_meta(data) {
                Err(Invalid(msg)) => error(out, rep::ERR_INVALID, &msg),
                Ok((name, queries)) => match exports.find(&name) {
                    None => error(
                        out,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {}", excerpt(&name)),
                    ),
                    Some(export) => {
                        let selected = if set {
                            queries.iter().any(|q| q == BASE_ALLOCATION)
                        } else {
                            queries.is_empty()
                                || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                        };
                        if set {
                            session.meta_for = selected.then(|| export.name().to_string());
                        }
                        if selected {
                            let id = if set { BASE_ALLOCATION_ID } else { 0 };
                            let mut d = id.to_be_bytes().to_vec();
                            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            wire::encode_option_reply(out, option, rep::META_CONTEXT, &d);
                        }
                        wire::encode_option_reply(out, option, rep::ACK, &[]);
                    }
                },
            }
            Step::Continue
        }
        other => {
            error(
                out,
                rep::ERR_UNSUP,
                &format!("option {other} is not supported"),
            );
            Step::Continue
        }
    }
}

/// Export name and requested information types of `NBD_OPT_INFO` / `NBD_OPT_GO`.
fn parse_info(data: &[u8]) -> Result<(String, Vec<u16>), Invalid> {
    let mut r = Reader::new(data);
    let len = r.u32("export name length")?;
    let name = r.string(len, "export name")?;
    let n = r.u16("information request count")?;
    let requests = (0..n)
        .map(|_| r.u16("information request"))
        .collect::<Result<Vec<_>, _>>()?;
    r.finish("NBD_OPT_INFO/GO")?;
    Ok((name, requests))
}

/// Export name and queries of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn parse_meta(data: &[u8]) -> Result<(String, Vec<String>), Invalid> {
    let mut r = Reader::new(data);
    let len = r.u32("export name length")?;
    let name = r.string(len, "export name")?;
    let n = r.u32("query count")?;
    // Each query needs at least its 4-byte length: bound the loop by the data size.
    if u64::from(n) * 4 > data.len() as u64 {
        return Err(Invalid(format!(
            "{n} queries do not fit in {} bytes",
            data.len()
        )));
    }
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = r.u32("query length")?;
        queries.push(r.string(len, "query")?);
    }
    r.finish("NBD_OPT_*_META_CONTEXT")?;
    Ok((name, queries))
}

fn encode_info(
    out: &mut Vec<u8>,
    option: u32,
    export: &Export,
    requests: &[u16],
    limits: &Limits,
    structured: bool,
) {
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.backend().size().to_be_bytes());
    d.extend_from_slice(&export.transmission_flags(structured).to_be_bytes());
    wire::encode_option_reply(out, option, rep::INFO, &d);
    // Block sizes are always sent: the server accepts any alignment anyway.
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&limits.min_block.to_be_bytes());
    d.extend_from_slice(&limits.preferred_block.to_be_bytes());
    d.extend_from_slice(&limits.max_payload.to_be_bytes());
    wire::encode_option_reply(out, option, rep::INFO, &d);
    if requests.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name().as_bytes());
        wire::encode_option_reply(out, option, rep::INFO, &d);
    }
    if requests.contains(&info::DESCRIPTION) && !export.describe().is_empty() {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(wire::truncate(export.describe(), wire::MAX_STRING).as_bytes());
        wire::encode_option_reply(out, option, rep::INFO, &d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_parsing_rejects_inconsistent_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(parse_info(&d).unwrap(), ("abc".into(), vec![info::NAME]));
        assert!(parse_info(&d[..d.len() - 1]).is_err());
        let mut longer = d.clone();
        longer.push(0);
        assert!(parse_info(&longer).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&d[4..]);
        assert!(parse_info(&huge).is_err());
    }

    /// The reply type of the single option reply in `out`.
    fn reply_kind(out: &[u8]) -> u32 {
        assert!(out.len() >= 20, "{out:?}");
        u32::from_be_bytes(out[12..16].try_into().unwrap())
    }

    fn step(option: u32, data: &[u8], tls: TlsState) -> (Step, Vec<u8>) {
        let mut exports = Exports::new();
        exports.add(Export::new(
            "disk",
            Arc::new(crate::MemoryBackend::new(vec![0; 4096], false)),
        ));
        let mut session = Session {
            tls,
            ..Session::default()
        };
        let mut out = Vec::new();
        let s = handle_option(
            option,
            data,
            &exports,
            &Limits::default(),
            &mut session,
            &mut out,
        );
        (s, out)
    }

    #[test]
    fn tls_required_answers_every_option_but_starttls_and_abort_with_tls_reqd() {
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        for (option, data) in [
            (opt::LIST, &[][..]),
            (opt::GO, &go[..]),
            (opt::INFO, &go[..]),
            (opt::STRUCTURED_REPLY, &[][..]),
            (opt::LIST_META_CONTEXT, &[][..]),
            (opt::SET_META_CONTEXT, &[][..]),
            (opt::EXTENDED_HEADERS, &[][..]),
            (999, &[][..]),
        ] {
            let (s, out) = step(option, data, TlsState::Required);
            assert!(matches!(s, Step::Continue), "option {option}");
            assert_eq!(reply_kind(&out), rep::ERR_TLS_REQD, "option {option}");
            // Once TLS runs, the same option is served.
            let (_, out) = step(option, data, TlsState::Active);
            assert_ne!(reply_kind(&out), rep::ERR_TLS_REQD, "option {option}");
        }
        // EXPORT_NAME cannot carry an error: the connection ends.
        let (s, _) = step(opt::EXPORT_NAME, b"disk", TlsState::Required);
        assert!(matches!(s, Step::Refuse(_)));
        let (s, out) = step(opt::ABORT, &[], TlsState::Required);
        assert!(matches!(s, Step::Abort));
        assert_eq!(reply_kind(&out), rep::ACK);
    }

    #[test]
    fn starttls_is_acked_once_and_refused_without_credentials() {
        for tls in [TlsState::Offered, TlsState::Required] {
            let (s, out) = step(opt::STARTTLS, &[], tls);
            assert!(matches!(s, Step::StartTls), "{tls:?}");
            assert_eq!(reply_kind(&out), rep::ACK);
            let (s, out) = step(opt::STARTTLS, b"x", tls);
            assert!(matches!(s, Step::Continue));
            assert_eq!(reply_kind(&out), rep::ERR_INVALID);
        }
        let (_, out) = step(opt::STARTTLS, &[], TlsState::Active);
        assert_eq!(reply_kind(&out), rep::ERR_INVALID);
        let (_, out) = step(opt::STARTTLS, &[], TlsState::Unavailable);
        assert_eq!(reply_kind(&out), rep::ERR_POLICY);
        // Offered, not required: plain options are served.
        let (_, out) = step(opt::LIST, &[], TlsState::Offered);
        assert_eq!(reply_kind(&out), rep::SERVER);
    }

    #[test]
    fn meta_parsing_bounds_the_query_count() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&d).is_err());
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            parse_meta(&d).unwrap(),
            (String::new(), vec![BASE_ALLOCATION.into()])
        );
    }
}
