//! The VM's serial console for `nomad alloc exec -i -t <alloc> console`:
//! what the guest prints goes to Nomad's log FIFO as always and, while a
//! session is attached, to that session too; one session at a time may type.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::{Mutex, broadcast};

pub struct Console {
    output: broadcast::Sender<Vec<u8>>,
    input: Mutex<Option<ChildStdin>>,
    attached: AtomicBool,
}

/// Held by the attached session; detaches when dropped.
pub struct Attachment {
    console: Arc<Console>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.console.attached.store(false, Ordering::SeqCst);
    }
}

impl Console {
    pub fn new(input: Option<ChildStdin>) -> Arc<Console> {
        Arc::new(Console {
            output: broadcast::channel(256).0,
            input: Mutex::new(input),
            attached: AtomicBool::new(false),
        })
    }

    /// Called by the output pump with everything the VMM prints.
    pub fn publish(&self, chunk: &[u8]) {
        // No receiver just means nobody is attached.
        let _ = self.output.send(chunk.to_vec());
    }

    /// The one session allowed to type, or `None` if one is attached.
    pub fn attach(self: &Arc<Self>) -> Option<Attachment> {
        self.attached
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Attachment { console: self.clone() })
    }

    /// Closes the VMM's stdin (when it has exited).
    pub async fn close_input(&self) {
        self.input.lock().await.take();
    }

    /// Relays between an attached session and the console until the session
    /// ends (the VM keeps running) or the VMM's output ends.
    pub async fn serve(
        self: &Arc<Self>,
        _attached: Attachment,
        mut from_session: impl AsyncRead + Unpin,
        mut to_session: impl AsyncWrite + Unpin,
    ) {
        let mut output = self.output.subscribe();
        let me = self.clone();
        let typing = async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match from_session.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut input = me.input.lock().await;
                        let Some(stdin) = input.as_mut() else { break };
                        if stdin.write_all(&buf[..n]).await.is_err() || stdin.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        let showing = async move {
            loop {
                match output.recv().await {
                    Ok(chunk) => {
                        if to_session.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        tokio::select! {
            _ = typing => {}
            _ = showing => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_writer_at_a_time() {
        let console = Console::new(None);
        let first = console.attach().expect("first session attaches");
        assert!(console.attach().is_none(), "a second session is refused");
        drop(first);
        assert!(console.attach().is_some(), "free again after detaching");
    }

    #[tokio::test]
    async fn output_reaches_the_session_and_typing_reaches_the_vmm() {
        let mut child = tokio::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let console = Console::new(child.stdin.take());
        let (session, ours) = tokio::io::duplex(1024);
        let (ours_read, mut ours_write) = tokio::io::split(ours);
        let attachment = console.attach().unwrap();
        let (sess_read, sess_write) = tokio::io::split(session);
        let c = console.clone();
        let served = tokio::spawn(async move { c.serve(attachment, sess_read, sess_write).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // typing goes to the VMM (cat echoes it on its stdout)
        ours_write.write_all(b"typed\n").await.unwrap();
        let mut echoed = vec![0u8; 6];
        child.stdout.as_mut().unwrap().read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"typed\n");
        // what the VMM prints reaches the session
        console.publish(b"guest says hi");
        let mut seen = vec![0u8; 13];
        let mut r = ours_read;
        r.read_exact(&mut seen).await.unwrap();
        assert_eq!(&seen, b"guest says hi");
        drop(ours_write);
        drop(r);
        tokio::time::timeout(std::time::Duration::from_secs(2), served).await.unwrap().unwrap();
        assert!(console.attach().is_some(), "detached when the session ended");
        let _ = child.kill().await;
    }
}
