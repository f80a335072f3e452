//! Sends responses and events for one request onto its connection.

use tartarus_proto::{encode_frame, Envelope, Message};
use tokio::sync::mpsc;

/// The outgoing side of one request: frames go to the connection's writer task, which
/// applies back-pressure through a bounded channel.
#[derive(Clone)]
pub struct Replier {
    out: mpsc::Sender<Vec<u8>>,
    id: u64,
}

impl Replier {
    pub fn new(out: mpsc::Sender<Vec<u8>>, id: u64) -> Self {
        Self { out, id }
    }

    /// Sends one message; false when the connection is gone.
    pub async fn send(&self, body: Message) -> bool {
        let frame = match encode_frame(&Envelope::new(self.id, body)) {
            Ok(frame) => frame,
            Err(err) => {
                let fallback = Message::error(tartarus_proto::codes::INTERNAL, err.to_string());
                match encode_frame(&Envelope::new(self.id, fallback)) {
                    Ok(frame) => frame,
                    Err(_) => return false,
                }
            }
        };
        self.out.send(frame).await.is_ok()
    }

    pub async fn error(&self, code: &str, message: impl Into<String>) -> bool {
        self.send(Message::error(code, message)).await
    }

    pub async fn ok(&self) -> bool {
        self.send(Message::Ok {}).await
    }
}
