//! The kernel's NBD device configured through generic netlink (`linux/nbd-netlink.h`),
//! as `nbd-client -netlink` and `qemu-nbd -c` do: connected sockets are handed to the
//! kernel by file descriptor, so no thread has to sit in an ioctl.
//!
//! Hand-rolled over a raw `AF_NETLINK` socket: a request is a `nlmsghdr`, a `genlmsghdr`
//! and attributes (`nlattr`: length, type, payload padded to 4 bytes); the kernel answers
//! with zero or more messages of the family, then an `NLMSG_ERROR` carrying 0 or -errno.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `NLMSG_ERROR`: an acknowledgement (error 0) or a failure (-errno).
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST | NLM_F_ACK`.
const REQUEST_ACK: u16 = 1 | 4;
/// The generic netlink controller's family id (`GENL_ID_CTRL`).
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`, `CTRL_ATTR_FAMILY_ID`, `CTRL_ATTR_FAMILY_NAME`.
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// `NBD_CMD_*` of the "nbd" family (version 1).
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
/// `NBD_ATTR_*`.
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// `NBD_SOCK_ITEM` (nested in `NBD_ATTR_SOCKETS`) and its `NBD_SOCK_FD`.
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How a device is set up by [`Nbd::connect`].
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Device size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Logical block size: 512, 1024, 2048 or 4096.
    pub block_size: u64,
    /// The export's transmission flags from the handshake (`NBD_FLAG_*`).
    pub server_flags: u16,
    /// Seconds a request may take before the kernel declares the connection dead.
    pub timeout_secs: u64,
    /// Seconds the kernel queues requests while every connection is dead, waiting for a
    /// [`Nbd::reconfigure`], before failing them.
    pub dead_conn_timeout_secs: u64,
}

/// A generic netlink socket talking to the kernel's "nbd" family.
pub struct Nbd {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl Nbd {
    /// Opens a netlink socket and looks the "nbd" family up.
    ///
    /// # Errors
    /// If netlink is unavailable, or the nbd module is not loaded (`ENOENT`).
    pub fn open() -> io::Result<Nbd> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut nl = Nbd {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut attrs = Vec::new();
        put(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let replies = nl
            .request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "the kernel has no \"nbd\" netlink family: load the nbd module \
                         (modprobe nbd)",
                    )
                } else {
                    e
                }
            })?;
        let id = replies
            .iter()
            .find_map(|r| attr(r, CTRL_ATTR_FAMILY_ID))
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_ne_bytes([v[0], v[1]]))
            .ok_or_else(|| io::Error::other("the kernel's reply names no nbd family id"))?;
        nl.family = id;
        Ok(nl)
    }

    /// `NBD_CMD_CONNECT`: device `index` serves over `sockets` (connected, past the
    /// handshake). The kernel takes its own references to the sockets.
    ///
    /// # Errors
    /// The kernel's refusal, e.g. `EBUSY` when the device is in use.
    pub fn connect(&mut self, index: u32, config: &Config, sockets: &[RawFd]) -> io::Result<()> {
        let mut a = Vec::new();
        put(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        put(&mut a, NBD_ATTR_SIZE_BYTES, &config.size.to_ne_bytes());
        put(
            &mut a,
            NBD_ATTR_BLOCK_SIZE_BYTES,
            &config.block_size.to_ne_bytes(),
        );
        put(
            &mut a,
            NBD_ATTR_SERVER_FLAGS,
            &u64::from(config.server_flags).to_ne_bytes(),
        );
        put(&mut a, NBD_ATTR_TIMEOUT, &config.timeout_secs.to_ne_bytes());
        put(
            &mut a,
            NBD_ATTR_DEAD_CONN_TIMEOUT,
            &config.dead_conn_timeout_secs.to_ne_bytes(),
        );
        put_sockets(&mut a, sockets);
        self.request(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &a)
            .map(drop)
    }

    /// `NBD_CMD_RECONFIGURE`: `sockets` replace dead connections of device `index`.
    ///
    /// # Errors
    /// The kernel's refusal, e.g. `EINVAL` when the device is not connected.
    pub fn reconfigure(&mut self, index: u32, sockets: &[RawFd]) -> io::Result<()> {
        let mut a = Vec::new();
        put(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        put_sockets(&mut a, sockets);
        self.request(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a)
            .map(drop)
    }

    /// `NBD_CMD_DISCONNECT`: the kernel sends `NBD_CMD_DISC` on every connection, shuts
    /// them down and fails new requests.
    ///
    /// # Errors
    /// The kernel's refusal, e.g. `EINVAL` for a device that does not exist.
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let mut a = Vec::new();
        put(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        self.request(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a)
            .map(drop)
    }

    /// Sends one request and collects the attribute bytes of every reply message until
    /// the acknowledgement.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&REQUEST_ACK.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(attrs);
        // To the kernel (port id 0): an unbound netlink socket's default destination.
        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes for the whole call.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other(format!(
                        "malformed netlink reply: message length {len} in {} bytes",
                        rest.len()
                    )));
                }
                let body = &rest[16..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                if kind == NLMSG_ERROR {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .ok_or_else(|| io::Error::other("truncated netlink error message"))?;
                    return match code {
                        0 => Ok(replies),
                        e => Err(io::Error::from_raw_os_error(-e)),
                    };
                }
                if kind == family && body.len() >= 4 {
                    replies.push(body[4..].to_vec());
                }
            }
        }
    }
}

/// Appends attribute `kind` with `data`, padded to 4 bytes.
fn put(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Appends the nested attribute `kind` holding what `fill` appends.
fn nest(buf: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    put(buf, kind, &[]);
    fill(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// `NBD_ATTR_SOCKETS` { `NBD_SOCK_ITEM` { `NBD_SOCK_FD` } ... }.
fn put_sockets(buf: &mut Vec<u8>, sockets: &[RawFd]) {
    nest(buf, NBD_ATTR_SOCKETS, |b| {
        for fd in sockets {
            nest(b, NBD_SOCK_ITEM, |b| {
                put(b, NBD_SOCK_FD, &(*fd as u32).to_ne_bytes())
            });
        }
    });
}

/// The payload of the first attribute `kind` in `attrs`.
fn attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = attrs;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        // Without NLA_F_NESTED and NLA_F_NET_BYTEORDER.
        let k = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if k == kind {
            return Some(&rest[4..len]);
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested_lengths_cover_their_children() {
        let mut b = Vec::new();
        put(&mut b, 2, b"nbd\0");
        put(&mut b, 9, &[1]);
        assert_eq!(b.len(), 8 + 8);
        assert_eq!(attr(&b, 9), Some(&[1u8][..]));
        assert_eq!(attr(&b, 2), Some(&b"nbd\0"[..]));
        assert_eq!(attr(&b, 3), None);
        let mut s = Vec::new();
        put_sockets(&mut s, &[5, 6]);
        // SOCKETS(4) + 2 * (ITEM(4) + FD(8)).
        assert_eq!(s.len(), 4 + 2 * 12);
        assert_eq!(u16::from_ne_bytes([s[0], s[1]]) as usize, s.len());
        let items = attr(&s, NBD_ATTR_SOCKETS).unwrap();
        let fd = attr(attr(items, NBD_SOCK_ITEM).unwrap(), NBD_SOCK_FD).unwrap();
        assert_eq!(fd, 5u32.to_ne_bytes());
        // A truncated attribute is not read past its end.
        assert_eq!(attr(&b[..6], 2), None);
    }
}
