//! A WebSocket echo app (tungstenite, an implementation independent of the worker's)
//! for tests that need a WebSocket upstream; `/refuse` answers 403, and the `chat`
//! subprotocol is accepted.
// tungstenite's handshake callback returns its own large error type.
#![allow(clippy::result_large_err)]

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::Message;

/// A WebSocket echo app; records the close codes it receives.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub closes: Arc<Mutex<Vec<u16>>>,
}

pub fn echo_app() -> EchoApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let closes = Arc::new(Mutex::new(Vec::new()));
    let c = closes.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let c = c.clone();
            std::thread::spawn(move || {
                let callback =
                    |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
                        if req.uri().path() == "/refuse" {
                            let mut e = ErrorResponse::new(Some("no".into()));
                            *e.status_mut() = tungstenite::http::StatusCode::FORBIDDEN;
                            return Err(e);
                        }
                        let wants_chat = req
                            .headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.split(',').any(|p| p.trim() == "chat"));
                        if wants_chat {
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", "chat".parse().expect("value"));
                        }
                        Ok(resp)
                    };
                let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
                    return;
                };
                loop {
                    match ws.read() {
                        Ok(Message::Text(t)) => {
                            if ws.send(Message::Text(t)).is_err() {
                                break;
                            }
                        }
                        Ok(Message::Binary(b)) => {
                            if ws.send(Message::Binary(b)).is_err() {
                                break;
                            }
                        }
                        Ok(Message::Close(frame)) => {
                            c.lock()
                                .expect("closes")
                                .push(frame.map_or(1005, |f| u16::from(f.code)));
                            let _ = ws.flush();
                            break;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
    EchoApp { addr, closes }
}
