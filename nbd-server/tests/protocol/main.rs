//! Protocol tests of the NBD server: raw bytes over `tokio::io::duplex`, libnbd's tools
//! over TCP, misbehaving clients against the limits, and the Unix socket.

mod clients;
mod duplex;
mod limits;
mod unix;
mod util;
