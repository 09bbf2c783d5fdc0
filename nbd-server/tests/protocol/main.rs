//! Protocol tests of the NBD server: raw bytes over `tokio::io::duplex`, and libnbd's
//! tools over TCP.

mod clients;
mod duplex;
mod util;
