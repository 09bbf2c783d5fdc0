//! Named exports and the limits advertised for them.

use std::sync::Arc;

use crate::backend::Backend;
use crate::wire::tflags;

/// One export: a name clients ask for and the backend behind it.
#[derive(Clone)]
pub struct Export {
    name: String,
    description: String,
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .finish()
    }
}

impl Export {
    /// An export called `name` serving `backend`.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            backend,
        }
    }

    /// Sets the human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    /// Default: empty.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Transmission flags for this export; `structured` says whether the client
    /// negotiated structured replies (`NBD_FLAG_SEND_DF` needs them).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let caps = self.backend.capabilities();
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_CACHE;
        if caps.writable {
            flags |= tflags::SEND_FUA | tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES;
        } else {
            flags |= tflags::READ_ONLY;
        }
        if caps.multi_conn {
            flags |= tflags::CAN_MULTI_CONN;
        }
        if structured {
            flags |= tflags::SEND_DF;
        }
        flags
    }
}

/// The exports of a server; the first one is the default, served for the empty name.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    list: Vec<Arc<Export>>,
}

impl Exports {
    /// No exports yet.
    pub fn new() -> Self {
        Exports::default()
    }

    /// Adds an export; a later export with the same name is never reachable by name.
    pub fn add(&mut self, export: Export) -> &mut Self {
        self.list.push(Arc::new(export));
        self
    }

    /// The export called `name`, or the default one for the empty name.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return self.list.first();
        }
        self.list.iter().find(|e| e.name == name)
    }

    /// All exports, default first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.list.iter()
    }

    /// True when there are no exports.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Block sizes advertised in `NBD_INFO_BLOCK_SIZE`, and the largest request accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Minimum block size; requests need no alignment beyond it. Default 1.
    pub min_block: u32,
    /// Preferred block size. Default 4096.
    pub preferred_block: u32,
    /// Largest READ or WRITE payload. Default 32 MiB.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_block: 1,
            preferred_block: 4096,
            max_payload: 32 << 20,
        }
    }
}
