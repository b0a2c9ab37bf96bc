//! What a park costs on this machine, against what a spin costs: the numbers the
//! reactor's spin budget (`[reactor] spin_polls`) is weighed with. A core that parks
//! in `epoll_wait` and is woken from another CPU pays a sleep and a wake-up (in a VM,
//! an exit and an inter-processor interrupt); a core that spins pays its empty polls.
//! Spinning for about as long as a park costs, then parking, never pays more than
//! twice the better of the two (the ski-rental rule the budget follows).

use std::os::fd::OwnedFd;
use std::time::Instant;

use rustix::event::{epoll, eventfd, EventfdFlags};

/// The measured costs.
#[derive(Debug, Clone, Copy)]
pub struct ParkCost {
    /// CPU time of one zero-timeout `epoll_wait` on an empty set, ns.
    pub empty_poll_ns: f64,
    /// CPU time on the parked thread per wake-up (a blocking `epoll_wait` woken by an
    /// eventfd written from the other CPU, the eventfd read and the answer's write
    /// included), ns.
    pub park_cpu_ns: f64,
    /// Wall time of that ping-pong round trip, ns.
    pub park_round_trip_ns: f64,
    /// The same ping-pong with the waiting side spinning on zero-timeout polls: CPU
    /// per wake-up, ns (equal to its wall time: a spinner is always busy).
    pub spin_cpu_ns: f64,
    /// Empty polls the spinner made per wake-up.
    pub spin_polls_per_wake: f64,
}

impl ParkCost {
    /// How many empty polls cost as much CPU as one park.
    pub fn break_even_polls(&self) -> f64 {
        self.park_cpu_ns / self.empty_poll_ns.max(1.0)
    }
}

/// This thread's CPU time, ns.
pub(crate) fn thread_cpu_ns() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 * 1e9 + t.tv_nsec as f64
}

/// Pins this thread to `cpu`.
pub(crate) fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

fn epoll_on(fd: &OwnedFd) -> anyhow::Result<OwnedFd> {
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &ep,
        fd,
        epoll::EventData::new_u64(1),
        epoll::EventFlags::IN | epoll::EventFlags::ET,
    )?;
    Ok(ep)
}

/// Waits for `ep` (`spin`: with zero-timeout polls, counting the empty ones), then
/// takes the eventfd's count.
fn wait(ep: &OwnedFd, fd: &OwnedFd, spin: bool, events: &mut Vec<epoll::Event>) -> u64 {
    let zero = rustix::event::Timespec::default();
    let mut empty = 0;
    loop {
        events.clear();
        let timeout = if spin { Some(&zero) } else { None };
        match epoll::wait(ep, rustix::buffer::spare_capacity(&mut *events), timeout) {
            Ok(n) if n > 0 => break,
            _ => empty += 1,
        }
    }
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd, &mut buf);
    empty
}

/// One ping-pong run of `n` round trips: this thread on `here` waits (parked or
/// spinning), a peer on `there` wakes it and waits for its answer (parked).
/// Returns (CPU ns here, wall ns, empty polls here).
fn ping_pong(here: usize, there: usize, n: u32, spin: bool) -> anyhow::Result<(f64, f64, u64)> {
    let to_here = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    let to_there = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    let ep_here = epoll_on(&to_here)?;
    let ep_there = epoll_on(&to_there)?;
    let one = 1u64.to_ne_bytes();
    let (wake_here, wait_there) = (to_here.try_clone()?, to_there.try_clone()?);
    let peer = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(there)?;
        let mut events = Vec::with_capacity(8);
        for _ in 0..n {
            rustix::io::write(&wake_here, &one)?;
            wait(&ep_there, &wait_there, false, &mut events);
        }
        Ok(())
    });
    pin(here)?;
    let mut events = Vec::with_capacity(8);
    let (cpu0, wall0) = (thread_cpu_ns(), Instant::now());
    let mut empty = 0;
    for _ in 0..n {
        empty += wait(&ep_here, &to_here, spin, &mut events);
        rustix::io::write(&to_there, &one)?;
    }
    let (cpu, wall) = (thread_cpu_ns() - cpu0, wall0.elapsed().as_nanos() as f64);
    peer.join()
        .map_err(|_| anyhow::anyhow!("the ping-pong peer panicked"))??;
    Ok((cpu, wall, empty))
}

/// Measures on CPUs `here` (the core's) and `there` (the waker's).
pub fn measure(here: usize, there: usize) -> anyhow::Result<ParkCost> {
    pin(here)?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let zero = rustix::event::Timespec::default();
    let mut events: Vec<epoll::Event> = Vec::with_capacity(8);
    let polls = 1_000_000u32;
    let cpu0 = thread_cpu_ns();
    for _ in 0..polls {
        events.clear();
        let _ = epoll::wait(
            &ep,
            rustix::buffer::spare_capacity(&mut events),
            Some(&zero),
        );
    }
    let empty_poll_ns = (thread_cpu_ns() - cpu0) / f64::from(polls);
    let n = 100_000u32;
    let (park_cpu, park_wall, _) = ping_pong(here, there, n, false)?;
    let (spin_cpu, _, spins) = ping_pong(here, there, n, true)?;
    Ok(ParkCost {
        empty_poll_ns,
        park_cpu_ns: park_cpu / f64::from(n),
        park_round_trip_ns: park_wall / f64::from(n),
        spin_cpu_ns: spin_cpu / f64::from(n),
        spin_polls_per_wake: spins as f64 / f64::from(n),
    })
}
