//! Writing the VM's console into Nomad's log FIFO. logmon reads the other
//! end; if it goes away (agent restart) the write fails with EPIPE, so the
//! sink reopens the FIFO on the next chunk rather than losing the rest.

use std::path::PathBuf;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;

pub struct LogSink {
    path: PathBuf,
    fifo: bool,
    writer: Option<Writer>,
}

enum Writer {
    Fifo(pipe::Sender),
    File(tokio::fs::File),
}

impl LogSink {
    pub fn new(path: PathBuf) -> LogSink {
        use std::os::unix::fs::FileTypeExt;
        let fifo = std::fs::metadata(&path).map(|m| m.file_type().is_fifo()).unwrap_or(false);
        LogSink { path, fifo, writer: None }
    }

    async fn open(&self) -> Option<Writer> {
        if self.fifo {
            // Non-blocking open: fails with ENXIO instead of hanging when
            // nobody reads the FIFO.
            pipe::OpenOptions::new().open_sender(&self.path).ok().map(Writer::Fifo)
        } else {
            tokio::fs::OpenOptions::new().append(true).create(false).open(&self.path).await.ok().map(Writer::File)
        }
    }

    /// Opens the FIFO right away. logmon's reader is blocked opening its
    /// end until a writer appears, and waits for it again when the task
    /// stops: a silent stream (qemu's stderr) must still connect, and be
    /// closed when the VMM is gone, or every stop waits logmon's timeouts.
    pub async fn connect(&mut self) {
        if self.writer.is_none() {
            self.writer = self.open().await;
        }
    }

    /// Writes `chunk`; drops it if the reader is gone and cannot be reopened.
    pub async fn write(&mut self, chunk: &[u8]) {
        for _attempt in 0..2 {
            if self.writer.is_none() {
                self.writer = self.open().await;
            }
            let ok = match self.writer.as_mut() {
                Some(Writer::Fifo(w)) => w.write_all(chunk).await.is_ok(),
                Some(Writer::File(f)) => f.write_all(chunk).await.is_ok(),
                None => return,
            };
            if ok {
                return;
            }
            self.writer = None;
        }
    }
}
