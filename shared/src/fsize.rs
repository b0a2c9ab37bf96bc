//! The file-size limit (`RLIMIT_FSIZE`): a write past it raises `SIGXFSZ`, whose
//! default action ends the process. Every component writes files a limit can stop
//! (its log on a stdout redirected to a file, the storage-proxy's uploads, the
//! coordinator's embedded database); each catches the signal at start, so such a
//! write fails with `EFBIG` and the component answers for it (an upload's 413, a
//! log line dropped, a store error) instead of dying with every connection it held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Set by the handler once a write has gone past the limit.
static REACHED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Catches `SIGXFSZ` for the rest of the process's life (its handler only notes
/// that the limit was reached; the write that went past it fails with `EFBIG`).
/// Call once at start; later calls do nothing. An error says the handler could not
/// be installed: the process then dies at the limit as before.
pub fn catch_limit_signal() -> std::io::Result<()> {
    if REACHED.get().is_some() {
        return Ok(());
    }
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGXFSZ, flag.clone())?;
    let _ = REACHED.set(flag);
    Ok(())
}

/// Whether a write of this process has gone past the file-size limit since
/// [`catch_limit_signal`].
pub fn limit_reached() -> bool {
    REACHED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}
