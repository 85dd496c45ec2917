//! Whether the client of a request is still connected, for handlers that wait on the engine
//! without writing: actix-web notices a closed connection only when it writes to it.
//!
//! At connect time [`on_connect`] keeps a duplicate of the connection's socket in the
//! connection's data; a waiting handler asks [`Peer::gone`], which peeks at it.
//!
//! Invariants:
//! - Peeking never takes bytes away from actix (`MSG_PEEK`): pending bytes, such as a pipelined
//!   next request, read as a client that is still there.
//! - Peeking never blocks: the duplicate shares the socket's non-blocking mode, which tokio set.
//! - Gone means end of stream or an error other than `WouldBlock` or `Interrupted` (a reset).
//! - A request without a recorded socket (tests through `actix_web::test`, non-Unix platforms, a
//!   socket that could not be duplicated) has no [`Peer`], so it is never reported gone.

use std::any::Any;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Extensions;
use actix_web::HttpRequest;

/// How often a waiting handler checks its client.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A duplicate of a connection's socket, for peeking only.
#[derive(Clone)]
pub struct Peer(Arc<TcpStream>);

/// `HttpServer::on_connect` hook: records the connection's socket.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    #[cfg(unix)]
    if let Some(sock) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsFd;
        match sock.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                ext.insert(Peer(Arc::new(TcpStream::from(fd))));
            }
            Err(e) => tracing::debug!(error = %e, "cannot duplicate a connection's socket"),
        }
    }
    #[cfg(not(unix))]
    let _ = (conn, ext);
}

impl Peer {
    /// The peer of `req`'s connection, when it was recorded.
    pub fn of(req: &HttpRequest) -> Option<Peer> {
        req.conn_data::<Peer>().cloned()
    }

    /// True once the client closed the connection (end of stream) or reset it.
    pub fn gone(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.0.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_closed_or_reset_peer_is_gone_and_pending_bytes_are_not_consumed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let peer = Peer(Arc::new(server.try_clone().unwrap()));
        assert!(!peer.gone(), "an idle open connection is not gone");
        client.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!peer.gone(), "pending bytes are not the end of the stream");
        assert!(!peer.gone(), "peeking did not consume them");
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        // The pending byte is still there; read it the way actix would, then the end shows.
        let mut buf = [0u8; 1];
        assert_eq!(server.peek(&mut buf).unwrap(), 1);
        let mut s = &server;
        assert_eq!(std::io::Read::read(&mut s, &mut buf).unwrap(), 1);
        assert!(peer.gone());
    }
}
