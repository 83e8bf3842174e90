//! Captures the WARN lines logged on the current thread. Tests that read them run on a
//! current-thread runtime, so the servers' tasks log there too: a server's reason for refusing
//! a peer is often only in its log (the peer learns at most an alert or an error code).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Starts capturing; capture ends when the guard is dropped.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The first line logged (since the last `clear`) containing every one of `needles`,
    /// waiting up to 3 s for it; panics with `context` and everything logged if none comes.
    pub async fn line(&self, context: &str, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let text = self.text();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{context}: no line logged contains all of {needles:?}; the log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
