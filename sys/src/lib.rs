//! The system calls the product needs that no safe wrapper offers, each behind a safe
//! function: the time slice the kernel's scheduler gives a thread (`sched_setattr`'s
//! `sched_runtime` for a normal thread, Linux 6.12 and later). This is the only crate of
//! the workspace that holds `unsafe`; every block carries its SAFETY note.
//!
//! Why a slice: on a CPU it shares with a busy process, a thread that asks for a
//! shorter slice is given an earlier virtual deadline by EEVDF, so it is run sooner
//! after it wakes (a request arrived) instead of waiting out the other process's
//! slice; its share of the CPU stays what its weight gives. The worker's cores ask for
//! one (`[reactor] sched_slice_us`, docs/dataplane.md, "A short scheduler slice").

use std::io;
use std::time::Duration;

/// `struct sched_attr` of `sched_setattr(2)` (its 56-byte form with utilization clamps).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_FLAG_RESET_ON_FORK: u64 = 0x01;

/// The shortest and longest slice the kernel accepts (it clamps to these).
pub const SLICE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_micros(100)..=Duration::from_millis(100);

fn get_attr(tid: libc::pid_t) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: `attr` is a live, writable `sched_attr` of `size` bytes, the length the
    // call is told; the kernel writes at most that many bytes into it and keeps no
    // pointer to it after returning.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            size,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_attr(attr: &SchedAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialized `sched_attr` whose `size` field is its
    // own size; the kernel only reads it, and only during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0 as libc::pid_t,
            attr as *const SchedAttr,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What asking for a slice came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceOutcome {
    /// The thread now runs with this slice (the kernel's clamp applied).
    Set(Duration),
    /// The kernel kept its own slice: it predates custom slices (before 6.12).
    Unsupported,
    /// The thread does not run under the fair scheduler (someone gave it a real-time
    /// policy, e.g. with `chrt`): left as it is.
    NotFair(u32),
}

/// Asks the kernel to give the calling thread a time slice of `slice` (clamped to
/// [`SLICE_RANGE`]), keeping its policy, nice value and fork behaviour, and reads the
/// result back.
pub fn set_current_thread_slice(slice: Duration) -> io::Result<SliceOutcome> {
    let mut attr = get_attr(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32
        && attr.sched_policy != libc::SCHED_BATCH as u32
    {
        return Ok(SliceOutcome::NotFair(attr.sched_policy));
    }
    let want = slice.clamp(*SLICE_RANGE.start(), *SLICE_RANGE.end());
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
    attr.sched_runtime = u64::try_from(want.as_nanos()).unwrap_or(u64::MAX);
    attr.sched_deadline = 0;
    attr.sched_period = 0;
    set_attr(&attr)?;
    Ok(match thread_slice(0)? {
        Some(now) if now == want => SliceOutcome::Set(now),
        _ => SliceOutcome::Unsupported,
    })
}

/// The slice the kernel reports for thread `tid` (0: the calling thread), when it
/// reports one (Linux 6.12 and later, for a thread under the fair scheduler).
pub fn thread_slice(tid: i32) -> io::Result<Option<Duration>> {
    let attr = get_attr(tid)?;
    let fair = attr.sched_policy == libc::SCHED_OTHER as u32
        || attr.sched_policy == libc::SCHED_BATCH as u32;
    Ok((fair && attr.sched_runtime > 0).then(|| Duration::from_nanos(attr.sched_runtime)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's slice is what it asked for, clamped to the kernel's range, on a
    /// kernel that has custom slices; on one that has none, the call says so.
    #[test]
    fn a_thread_runs_with_the_slice_it_asked_for() {
        std::thread::spawn(|| {
            let supported = thread_slice(0).expect("sched_getattr").is_some();
            for (ask, want) in [
                (Duration::from_micros(250), Duration::from_micros(250)),
                (Duration::from_micros(10), Duration::from_micros(100)),
                (Duration::from_secs(1), Duration::from_millis(100)),
            ] {
                let got = set_current_thread_slice(ask).expect("sched_setattr");
                if supported {
                    assert_eq!(got, SliceOutcome::Set(want), "asked {ask:?}");
                    assert_eq!(thread_slice(0).expect("read back"), Some(want));
                } else {
                    assert_eq!(got, SliceOutcome::Unsupported);
                }
            }
        })
        .join()
        .expect("the thread");
    }

    /// The slice is the thread's own: another thread keeps the kernel's.
    #[test]
    fn the_slice_is_the_calling_threads_alone() {
        let before = thread_slice(0).expect("sched_getattr");
        std::thread::spawn(|| set_current_thread_slice(Duration::from_micros(300)).expect("set"))
            .join()
            .expect("the thread");
        assert_eq!(thread_slice(0).expect("sched_getattr"), before);
    }

    /// Asking about a thread that does not exist is an error, not a made-up answer.
    #[test]
    fn an_unknown_thread_is_an_error() {
        assert!(thread_slice(i32::MAX).is_err());
    }
}
