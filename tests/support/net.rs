//! Ports for the servers the tests start, and a client connection that buffers little.

use std::net::TcpListener;

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot find a free port")
}

/// A base for worker ports unlikely to collide with parallel tests: a free port with 20 free after it.
pub fn free_base_port() -> u16 {
    loop {
        let p = free_port();
        if p < 65000 && (p..p + 20).all(|q| TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
}

/// A TCP connection to 127.0.0.1:`port` that buffers as little as Linux allows: a 4 KiB receive
/// buffer, and a 536-byte maximum segment size, which also keeps the server's send buffer small
/// (Linux sizes it from the MSS; on loopback it would otherwise start at about 2.6 MB). A client
/// that stops reading on it stalls the server's writes within a few tens of KiB.
pub async fn connect_with_small_buffers(port: u16) -> tokio::net::TcpStream {
    use std::os::fd::AsRawFd;
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    let mss: libc::c_int = 536;
    // SAFETY: setsockopt(2) on a socket this function owns, given a pointer to a live c_int and its
    // size; it reads nothing else.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    s.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}
