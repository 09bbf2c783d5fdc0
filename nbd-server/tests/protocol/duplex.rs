//! Raw protocol exchanges over `tokio::io::duplex`.
