//! [`MirrorStore`]: copies of one store, tried in order by every request.
//!
//! Each read goes to the first mirror that is in good standing, then the next, until one
//! answers. A mirror that fails a request (after its own retries: down, refusing,
//! answering garbage) or that served bytes failing verification loses its standing: later
//! requests try it only after every mirror in good standing. A file one mirror lacks (a
//! mirror that has not caught up) is asked of the next, without loss of standing. Bytes
//! that failed verification ([`StoreRead::bad_bytes`]) are asked again of another mirror
//! than the one that served them. Every such event is told once per mirror and kind to
//! the `warn` callback, naming the mirror and why; a dead or corrupt mirror costs time,
//! never the update.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tessera_engine::store::{PackId, StoreRead};
use tessera_engine::{Error, Result};

/// Ranges remembered with the mirror that served them.
const SERVED: usize = 4096;

/// Called with each warning (once per mirror and kind of failure).
pub type Warn = dyn Fn(&str) + Send + Sync;

/// Several copies of one store ([`StoreRead`] only: mirrors are for readers).
pub struct MirrorStore {
    mirrors: Vec<Arc<dyn StoreRead>>,
    names: Vec<String>,
    state: Mutex<State>,
    warn: Box<Warn>,
}

#[derive(Default)]
struct State {
    /// Mirrors that failed or served bad bytes: tried last.
    demoted: Vec<bool>,
    /// (rel, first, last, mirror) of recent ranges read.
    served: VecDeque<(String, u64, u64, usize)>,
    /// (rel, first, last, mirror) of bytes that failed verification.
    bad: VecDeque<(String, u64, u64, usize)>,
    /// (mirror, kind) already warned of.
    warned: Vec<(usize, &'static str)>,
}

impl std::fmt::Debug for MirrorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorStore")
            .field("mirrors", &self.names)
            .finish()
    }
}

/// What one mirror did with a request.
enum Outcome<T> {
    Found(T),
    Missing(Error),
    Failed(Error),
}

impl MirrorStore {
    /// The stores in `mirrors`, tried in this order; `warn` hears of each mirror that
    /// fails.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list.
    pub fn new(mirrors: Vec<Arc<dyn StoreRead>>, warn: Box<Warn>) -> Result<MirrorStore> {
        if mirrors.is_empty() {
            return Err(Error::InvalidInput("no store given".into()));
        }
        let names = mirrors.iter().map(|m| m.location()).collect();
        Ok(MirrorStore {
            state: Mutex::new(State {
                demoted: vec![false; mirrors.len()],
                ..State::default()
            }),
            mirrors,
            names,
            warn,
        })
    }

    /// The order to try the mirrors in for bytes `first..=last` of `rel`: in good
    /// standing first, then demoted ones, then those that served these bytes bad.
    fn order(&self, rel: &str, first: u64, last: u64) -> Vec<usize> {
        let state = self.state.lock().expect("mirror state");
        let served_bad = |i: usize| {
            state
                .bad
                .iter()
                .any(|(r, a, b, m)| *m == i && r == rel && *a <= last && first <= *b)
        };
        let mut order: Vec<usize> = (0..self.mirrors.len()).collect();
        order.sort_by_key(|&i| (served_bad(i), state.demoted[i]));
        order
    }

    /// Tells `warn` once per mirror and kind.
    fn warn_once(&self, mirror: usize, kind: &'static str, msg: impl FnOnce() -> String) {
        let first = {
            let mut state = self.state.lock().expect("mirror state");
            let first = !state.warned.contains(&(mirror, kind));
            if first {
                state.warned.push((mirror, kind));
            }
            first
        };
        if first {
            (self.warn)(&format!(
                "mirror {} ({}) {}",
                mirror + 1,
                self.names[mirror],
                msg()
            ));
        }
    }

    fn demote(&self, mirror: usize) {
        self.state.lock().expect("mirror state").demoted[mirror] = true;
    }

    /// Runs `op` on the mirrors in `order` until one finds what is asked; a mirror that
    /// fails is demoted and warned of. With none finding it: the first mirror's "missing"
    /// when none failed, else an error listing every mirror's.
    fn each<T>(
        &self,
        what: &str,
        order: &[usize],
        op: impl Fn(&dyn StoreRead) -> Outcome<T>,
    ) -> Result<(T, usize)> {
        let mut missing = None;
        let mut lacking = Vec::new();
        let mut failures = Vec::new();
        let mut refused = true;
        // Retrying later helps when any mirror failed on the network.
        let mut remote = false;
        for (k, &i) in order.iter().enumerate() {
            let next = order
                .get(k + 1)
                .map_or(String::new(), |&n| format!("; trying mirror {}", n + 1));
            match op(&*self.mirrors[i]) {
                Outcome::Found(v) => {
                    for &l in &lacking {
                        self.warn_once(l, "missing", || {
                            format!("lacks {what}, which mirror {} has (not caught up?)", i + 1)
                        });
                    }
                    return Ok((v, i));
                }
                Outcome::Missing(e) => {
                    lacking.push(i);
                    missing.get_or_insert(e);
                }
                Outcome::Failed(e) => {
                    let msg = chain(&e);
                    refused &= is_refused(&e);
                    remote |= e.is_remote();
                    self.demote(i);
                    self.warn_once(i, "failed", || {
                        format!("failed: {msg}; it is tried last from now on{next}")
                    });
                    failures.push(format!("mirror {} ({}): {msg}", i + 1, self.names[i]));
                }
            }
        }
        match missing {
            Some(e) if failures.is_empty() => Err(e),
            _ => {
                let kind = if refused {
                    std::io::ErrorKind::PermissionDenied
                } else {
                    std::io::ErrorKind::Other
                };
                let fail = if remote { Error::remote_io } else { Error::io };
                Err(fail(
                    "fetching",
                    std::path::PathBuf::from(what),
                    std::io::Error::new(
                        kind,
                        format!("every mirror failed or lacks it: {}", failures.join("; ")),
                    ),
                ))
            }
        }
    }
}

/// The error and its sources, as `{:#}` prints them.
fn chain(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

fn is_refused(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
}

impl StoreRead for MirrorStore {
    /// The first mirror's location (messages about one file name the mirror it was read
    /// from, or every mirror when all failed).
    fn location(&self) -> String {
        self.names[0].clone()
    }

    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let what = format!("{rel} of store {}", self.names[0]);
        let found = self.each(&what, &self.order(rel, 0, u64::MAX), |m| {
            match m.read_file(rel, limit) {
                Ok(Some(b)) => Outcome::Found(b),
                Ok(None) => Outcome::Missing(Error::MissingFile {
                    origin: what.clone(),
                }),
                Err(e) => Outcome::Failed(e),
            }
        });
        match found {
            Ok((b, _)) => Ok(Some(b)),
            Err(Error::MissingFile { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let last = offset.saturating_add(len.saturating_sub(1));
        let what = format!("{rel} (bytes {offset}-{last}) of store {}", self.names[0]);
        let (bytes, mirror) = self.each(&what, &self.order(rel, offset, last), |m| {
            match m.read_range(rel, offset, len) {
                Ok(b) => Outcome::Found(b),
                Err(e @ Error::MissingFile { .. }) => Outcome::Missing(e),
                Err(e) => Outcome::Failed(e),
            }
        })?;
        let mut state = self.state.lock().expect("mirror state");
        if state.served.len() >= SERVED {
            state.served.pop_front();
        }
        state
            .served
            .push_back((rel.to_string(), offset, last, mirror));
        Ok(bytes)
    }

    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        let what = format!("{rel} of store {}", self.names[0]);
        match self.each(&what, &self.order(rel, 0, u64::MAX), |m| {
            match m.file_size(rel) {
                Ok(Some(n)) => Outcome::Found(n),
                Ok(None) => Outcome::Missing(Error::MissingFile {
                    origin: what.clone(),
                }),
                Err(e) => Outcome::Failed(e),
            }
        }) {
            Ok((n, _)) => Ok(Some(n)),
            Err(Error::MissingFile { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list_packs(&self) -> Result<Vec<PackId>> {
        let what = format!("the pack list of store {}", self.names[0]);
        let order: Vec<usize> = (0..self.mirrors.len()).collect();
        self.each(&what, &order, |m| match m.list_packs() {
            Ok(p) => Outcome::Found(p),
            Err(e) => Outcome::Failed(e),
        })
        .map(|(p, _)| p)
    }

    fn in_flight(&self) -> usize {
        self.mirrors
            .iter()
            .map(|m| m.in_flight())
            .max()
            .unwrap_or(1)
    }

    /// The most any mirror retries, plus one fetch from each other mirror.
    fn retries(&self) -> u32 {
        let most = self.mirrors.iter().map(|m| m.retries()).max().unwrap_or(0);
        most.saturating_add(self.mirrors.len() as u32 - 1)
    }

    fn bad_bytes(&self, rel: &str, offset: u64, len: u64, why: &Error) {
        let last = offset.saturating_add(len.saturating_sub(1));
        let mirror = {
            let mut state = self.state.lock().expect("mirror state");
            let Some(mirror) = state
                .served
                .iter()
                .rev()
                .find(|(r, a, b, _)| r == rel && *a <= offset && last <= *b)
                .map(|s| s.3)
            else {
                return;
            };
            if state.bad.len() >= SERVED {
                state.bad.pop_front();
            }
            state.bad.push_back((rel.to_string(), offset, last, mirror));
            state.demoted[mirror] = true;
            mirror
        };
        self.mirrors[mirror].bad_bytes(rel, offset, len, why);
        self.warn_once(mirror, "corrupt", || {
            // The fetcher names the bytes by this store's location, the first mirror's:
            // name the mirror that served them instead.
            let why = chain(why).replace(&self.names[0], &self.names[mirror]);
            format!(
                "served bytes that failed verification ({why}); they are fetched from \
                 another mirror and it is tried last from now on"
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_engine::store::StoreWrite;
    use tessera_engine::LocalStore;

    fn local(dir: &std::path::Path, name: &str, content: Option<&[u8]>) -> Arc<dyn StoreRead> {
        let s = LocalStore::open(dir.join(name), true).unwrap();
        if let Some(c) = content {
            s.put_file("locations/x.tloc", c).unwrap();
        }
        Arc::new(s)
    }

    fn warnings() -> (Arc<Mutex<Vec<String>>>, Box<Warn>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            seen,
            Box::new(move |m: &str| s.lock().unwrap().push(m.into())),
        )
    }

    /// A mirror lacking a file is passed over without losing its standing; bytes it
    /// served bad are asked of the next mirror, which it then comes after.
    #[test]
    fn missing_files_and_bad_bytes_go_to_the_next_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let a = local(dir.path(), "a", None);
        let b = local(dir.path(), "b", Some(b"0123456789"));
        let (seen, warn) = warnings();
        let m = MirrorStore::new(vec![a, b], warn).unwrap();
        assert_eq!(
            m.read_file("locations/x.tloc", 100).unwrap().unwrap(),
            b"0123456789"
        );
        assert_eq!(m.read_file("locations/y.tloc", 100).unwrap(), None);
        assert_eq!(m.file_size("locations/x.tloc").unwrap(), Some(10));
        assert_eq!(
            m.order("p", 0, 1),
            vec![0, 1],
            "a missing file does not demote"
        );
        assert_eq!(m.read_range("locations/x.tloc", 2, 3).unwrap(), b"234");
        let why = Error::InvalidInput("hash mismatch".into());
        m.bad_bytes("locations/x.tloc", 3, 1, &why);
        assert_eq!(m.order("locations/x.tloc", 3, 3), vec![0, 1]);
        let seen = seen.lock().unwrap();
        assert!(
            seen[0].starts_with("mirror 1 (") && seen[0].contains("lacks"),
            "{seen:?}"
        );
        assert!(
            seen[1].starts_with("mirror 2 (") && seen[1].contains("hash mismatch"),
            "{seen:?}"
        );
        assert_eq!(seen.len(), 2, "each kind once per mirror: {seen:?}");
        assert_eq!(m.retries(), 1);
    }

    #[test]
    fn failures_demote_and_all_failing_names_every_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::StoreOptions {
            retries: 0,
            ..crate::StoreOptions::default()
        };
        let dead: Arc<dyn StoreRead> =
            Arc::new(crate::RemoteStore::open("http://127.0.0.1:9/s", &opts).unwrap());
        let good = local(dir.path(), "good", Some(b"abc"));
        let (seen, warn) = warnings();
        let m = MirrorStore::new(vec![dead.clone(), good], warn).unwrap();
        assert_eq!(
            m.read_file("locations/x.tloc", 100).unwrap().unwrap(),
            b"abc"
        );
        assert_eq!(
            m.order("locations/x.tloc", 0, 0),
            vec![1, 0],
            "dead one last"
        );
        assert!(seen.lock().unwrap()[0].contains("http://127.0.0.1:9/s"));
        let (_, warn) = warnings();
        let m = MirrorStore::new(vec![dead.clone(), dead], warn).unwrap();
        let e = chain(&m.read_file("locations/x.tloc", 100).unwrap_err());
        assert!(e.contains("mirror 1 (") && e.contains("mirror 2 ("), "{e}");
    }
}
