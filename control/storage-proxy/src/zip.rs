//! A streaming zip writer for directory and multi-file downloads: entries carry data
//! descriptors, so the archive is produced in one pass with no seeking. Its memory
//! does not grow with its entries' data, nor with their number beyond one compact
//! hash of each name (see `Names`): the central directory goes to an unlinked
//! temporary file as it is made and is streamed back at the end, and a directory
//! is read twice (its names reserved, then archived) rather than held, since a
//! user with a shell can make a million empty files in seconds. Each file's first
//! 64 KiB decide how it is written: deflated when a trial compression of them saves
//! at least 10 % (text, CSV, JSON, logs), sent as they are otherwise (models,
//! images, archives: already compressed or incompressible, where deflate only costs
//! CPU). A file that takes less than half its size on disk is sent as it is
//! whatever it holds: holes read as zeros, which a user can make free of disk and
//! quota (`truncate -s 8G`) and which deflate to almost nothing, so the archive
//! would burn a CPU-second for each megabyte it sends; sent as they are, an archive
//! costs what a download of its bytes does (the filesystem's own compression also
//! shows as fewer blocks: such a file is merely sent uncompressed). Blocks do not
//! tell zeros from data (`fallocate -l 8G` allocates them, and they read as zeros),
//! so deflate is also held to the bytes sent: an archive gives it at most
//! `DEFLATE_RATIO` (20) bytes for each it has sent, beyond a few MiB; past that an
//! entry's rest goes in stored blocks of the same deflate stream, and the next
//! files are sent as they are until the ratio allows deflating again.
//!
//! Every file entry is method 8 (deflate), even one sent as it is: its bytes go in
//! deflate stored blocks (see `stored_blocks`), which say their own length, so the
//! entry's data ends where its deflate stream does. Never method 0 (stored) with a
//! data descriptor: that entry has no length anywhere before its data, and a
//! streaming extractor (libarchive's `bsdtar` reading a pipe, Windows `tar.exe`)
//! takes the first `PK\x07\x08` in the file's bytes for its end and reads what
//! follows as the archive's next entries, so a vfolder user could put a forged
//! entry (a set-user-ID file, a symlink to `/etc/shadow`) into the archive of
//! whoever downloads the folder, absent from the central directory that `unzip`
//! checks. Empty directories are kept as directory entries, method 0 with their
//! (zero) sizes and CRC in the local header and no data descriptor. Zip64 is
//! used where the classic format ends: for an entry of 4 GiB or more, less a
//! margin for what deflate adds (its size is known from `fstat` before it is
//! streamed), for an entry whose header starts past 4 GiB (central directory), and
//! for the end records when the directory, its offset or the entry count overflow.
//!
//! The walk goes by descriptor from each directory being archived: every
//! subdirectory and file is opened with `O_NOFOLLOW` beneath its parent, so a
//! symlink (even one swapped in while the archive streams) is never entered or read.
//!
//! Entry names are made safe to extract on the common platforms (no backslash, `:`
//! or control character; UTF-8; no part longer than 255 bytes) and unique within
//! the archive (see `Names`). A directory's files are written sorted by name when
//! it has no more than `SORTED_UP_TO` of them, in the order it is read otherwise.

use std::io::Read as _;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use miniz_oxide::deflate::core::{
    compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
};
use rustix::fs::FileType;
use tokio::sync::mpsc;

use super::fsx;
use super::manager::StagingCheck;

/// Where the classic format's 32-bit fields end.
const LIMIT: u64 = u32::MAX as u64;

/// One thing to archive.
pub enum Item {
    /// A directory (walked) and the name prefix of its entries (empty or ending `/`).
    Dir(OwnedFd, Vec<u8>),
    /// A regular file and its entry name.
    File(std::fs::File, Vec<u8>),
    /// A file or directory beneath a vfolder (its descriptor), opened when its turn
    /// comes and named by its path.
    Beneath(Arc<OwnedFd>, Vec<std::ffi::OsString>),
}

/// One entry of the central directory, written to `Central` as soon as it is made.
struct Entry<'n> {
    name: &'n [u8],
    crc: u32,
    size: u64,
    csize: u64,
    offset: u64,
    mode: u32,
    /// Its modification time, as MS-DOS has it ([`dos_stamp`]).
    stamp: DosStamp,
    zip64: bool,
    /// Whether its data is a deflate stream (method 8) followed by a data
    /// descriptor; otherwise it has no data (method 0, sizes in the local header).
    deflate: bool,
}

/// A modification time as a zip entry holds it: MS-DOS's time and date fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DosStamp {
    time: u16,
    date: u16,
}

/// `mtime` (seconds since the epoch) as MS-DOS's time and date, in UTC, to the even
/// second below, within what they hold (1980 to 2107; outside, the nearest end).
/// Before, every entry was dated 1980-01-01 00:00, and an extracted folder lost
/// every file's time (an outside tester's find); the original stores each file's.
fn dos_stamp(mtime: i64) -> DosStamp {
    // 1980-01-01 and 2107-12-31 23:59:58, in seconds since the epoch.
    let secs = mtime.clamp(315_532_800, 4_354_819_198);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    DosStamp {
        time: ((hour << 11) | (minute << 5) | (second / 2)) as u16,
        date: (((year - 1980) << 9) | (month << 5) | day) as u16,
    }
}

/// General-purpose flags: names in UTF-8 (bit 11).
const FLAG_UTF8: u16 = 0x0800;
/// General-purpose flags: CRC and sizes in a data descriptor after the data (bit 3).
/// Only ever with method 8, whose stream delimits itself.
const FLAG_DESCRIPTOR: u16 = 0x0008;

/// The most bytes one deflate stored block carries (its `LEN` is 16 bits).
const STORED_BLOCK: usize = u16::MAX as usize;

/// The final, empty stored block that ends a stream of stored blocks.
const STORED_END: [u8; 5] = [0x01, 0x00, 0x00, 0xff, 0xff];

/// Appends `data` to `out` as deflate stored blocks (RFC 1951 3.2.4), none of them
/// final (the stream ends with [`STORED_END`]): a header byte `00` (BTYPE 00 puts
/// the block on a byte boundary), `LEN` and its complement `NLEN` (little-endian),
/// then up to [`STORED_BLOCK`] bytes as they are. An inflater, and so every
/// extractor, skips exactly `LEN` bytes: nothing in them is read as a header.
fn stored_blocks(data: &[u8], out: &mut Vec<u8>) {
    for block in data.chunks(STORED_BLOCK) {
        let len = block.len() as u16;
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// What deflate may add to an entry of 4 GiB: stored blocks add 5 bytes in 65,535;
/// a deflated stream of data that does not compress, hardly more. An entry this
/// close to the classic limit gets zip64 sizes from the start.
const DEFLATE_MARGIN: u64 = 16 << 20;

/// Raw deflate (no zlib header) at a fast level.
fn compressor() -> CompressorOxide {
    CompressorOxide::new(create_comp_flags_from_zip_params(1, -15, 0))
}

/// How many bytes an archive may give deflate for each byte it has sent, beyond
/// [`DEFLATE_SLACK`]: the CPU an archive costs is bounded by the bytes its client
/// takes, whatever its files hold. Text, CSV, JSON and logs deflate 3:1 to 10:1
/// and are never near it; zeros deflate about 1,000:1, and a user makes gigabytes
/// of them free of time (`fallocate -l 8G`: blocks allocated, so no file "mostly
/// holes", every read zeros), which had an archive read and deflate some 200 bytes
/// for each it sent (1.3 of 2 cores for a client taking 10 MB/s).
const DEFLATE_RATIO: u64 = 20;

/// What an archive may give deflate before [`DEFLATE_RATIO`] applies: a few
/// milliseconds of CPU, so a small archive of very compressible files is deflated
/// whole.
const DEFLATE_SLACK: u64 = 4 << 20;

/// Whether deflating pays for data that starts with `sample`.
fn compresses(sample: &[u8]) -> bool {
    if sample.len() < 64 {
        return false;
    }
    let mut out = Vec::new();
    deflate_into(&mut compressor(), sample, TDEFLFlush::Finish, &mut out).is_ok()
        && out.len() * 10 < sample.len() * 9
}

/// Feeds `input` to the compressor and appends what it produces to `out`; with
/// `Finish`, until the stream is complete.
fn deflate_into(
    c: &mut CompressorOxide,
    mut input: &[u8],
    flush: TDEFLFlush,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let (status, used, produced) = compress(c, input, &mut buf, flush);
        out.extend_from_slice(&buf[..produced]);
        input = &input[used..];
        match status {
            TDEFLStatus::Done => return Ok(()),
            TDEFLStatus::Okay
                if flush != TDEFLFlush::Finish && input.is_empty() && produced < buf.len() =>
            {
                return Ok(())
            }
            TDEFLStatus::Okay => {}
            _ => return Err(std::io::Error::other("deflate failed")),
        }
    }
}

/// Streams a zip of every regular file and empty directory under `root` (symlinks
/// are not followed); with `skip_staging`, the top-level `.upload` is left out.
pub fn stream_dir(
    root: OwnedFd,
    skip_staging: bool,
    stall: Duration,
    permit: crate::archive_slots::ArchivePermit,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    stream_items(
        vec![Item::Dir(root, Vec::new())],
        skip_staging,
        stall,
        permit,
    )
}

/// Waits for an archive's first bytes. An archive that fails before it has sent any
/// (no temporary file for its central directory, say) is then answered with an
/// error status, not a 200 cut off at once; one that fails later can only be cut
/// off. The wait is the writer's, never the client's: the first bytes go to the
/// channel before the client is asked to take any.
pub async fn first_bytes<S>(
    stream: S,
) -> std::io::Result<impl futures_util::Stream<Item = std::io::Result<Bytes>>>
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>>,
{
    use futures_util::StreamExt as _;
    let mut stream = Box::pin(stream);
    match stream.next().await {
        Some(Err(e)) => Err(e),
        first => Ok(futures_util::stream::iter(first).chain(stream)),
    }
}

/// Streams a zip of the given files and directories. The archive is written on a
/// blocking thread that waits while the client takes no bytes: for `stall` at most,
/// then the archive is abandoned and the response ends in an error (never as a
/// complete body), so a client that stops reading cannot hold the thread for ever.
/// `permit` (a slot of `[storage] max_archive_streams`) is held by the thread to its
/// end, so that slow clients never hold more threads than that.
pub fn stream_items(
    items: Vec<Item>,
    skip_staging: bool,
    stall: Duration,
    permit: crate::archive_slots::ArchivePermit,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    appproxy_shared::context::spawn_blocking(move || {
        // The listed paths are resolved again as their turn comes: within a budget
        // of their own, as the check before the first byte was.
        let written = fsx::resolving(|| {
            Writer::new(&tx, LIMIT, stall).and_then(|mut w| {
                w.watch = Some(permit.streaming.clone());
                w.archive(items, skip_staging)
            })
        });
        drop(permit);
        match written {
            Ok(()) => done.store(true, Ordering::Release),
            Err(e) => {
                tracing::warn!(error = %e, "archive stream failed");
                let _ = tx.try_send(Err(e));
            }
        }
    });
    futures_util::stream::unfold(Some(rx), move |rx| {
        let finished = finished.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(item) => Some((item, Some(rx))),
                // The writer stopped before the end of the archive: an error, so the
                // response is cut off rather than ended as if it were whole.
                None if !finished.load(Ordering::Acquire) => {
                    Some((Err(std::io::Error::other("the archive ended early")), None))
                }
                None => None,
            }
        }
    })
}

/// Entry names past this are left out: a zip header says a name's length in 16 bits.
const MAX_NAME: usize = u16::MAX as usize;

/// Appends one path component to an entry name so that it is safe to extract on
/// the common platforms: UTF-8 (invalid bytes become U+FFFD, as flag bit 11
/// promises UTF-8), and these characters as `_`:
/// - a backslash, legal in a Linux file name but a path separator to Windows
///   extractors: a vfolder user can name a file `..\..\startup\x.bat`, and a
///   project member who downloads the folder on Windows would extract it outside
///   the target directory (zip slip);
/// - `:`, which Windows reads as a drive (`C:` first: an absolute path, out of the
///   target directory again) or an NTFS alternate data stream (`a:b` writes a
///   hidden stream of `a`);
/// - control characters (C0, DEL, C1: newlines, escapes), which Windows refuses
///   in names and which rewrite the terminal of whoever lists the archive.
///
/// Everything else stays as it is (spaces, unicode, `<>?*|"`, which Windows
/// extractors refuse or replace themselves, harmlessly). A component made longer
/// than `NAME_MAX` bytes (each byte that is not UTF-8 becomes three) is cut there,
/// at a character: no file system would take it, and an extractor fails on it.
/// Returns whether the component had to change.
fn push_component(out: &mut Vec<u8>, name: &std::ffi::OsStr) -> bool {
    let start = out.len();
    let text = name.to_string_lossy();
    let mut changed = matches!(text, std::borrow::Cow::Owned(_));
    let mut utf8 = [0u8; 4];
    for c in text.chars() {
        if c == '\\' || c == ':' || c.is_control() {
            out.push(b'_');
            changed = true;
        } else {
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
    changed |= cut_at_char(out, start + NAME_MAX);
    changed
}

/// The most bytes of one file name on the common file systems.
const NAME_MAX: usize = 255;

/// Cuts the UTF-8 `name` to at most `len` bytes, at a character; whether it was.
fn cut_at_char(name: &mut Vec<u8>, mut len: usize) -> bool {
    if name.len() <= len {
        return false;
    }
    while len > 0 && name[len] & 0xC0 == 0x80 {
        len -= 1;
    }
    name.truncate(len);
    true
}

/// Logs an entry whose name was changed to be safe to extract.
fn note_renamed(name: &[u8]) {
    tracing::warn!(
        entry = %String::from_utf8_lossy(name),
        "archive entry name had a backslash, `:`, a control character or bytes that are not UTF-8: written with `_` / U+FFFD"
    );
}

/// The names given in one archive, so that no two entries end up with one name, nor
/// a file with the name of a directory: an extractor would overwrite the first with
/// the second, ask, or fail. Names collide once made safe (`a\b` and `a_b`, two
/// invalid UTF-8 names, `a:b` and `a_b`) or when a download lists paths that meet
/// (a file listed beside its directory's symlink; a path listed twice or inside
/// another listed one is archived once, see `outermost`). A name that needed no change keeps it: each directory is
/// read once to reserve its names before it is read again to archive its entries.
/// Names that collide only once made safe contest the safe name: the one whose
/// name on disk hashes highest keeps it, an order that does not depend on the order
/// in which the directory is read. An entry whose name is taken gets ` (1)`, ` (2)`,
/// … before its extension (`a_b (1).txt`), logged. A directory met again under the
/// same name (the parent of two listed paths, a directory listed twice) is the same
/// directory and is merged.
///
/// This is what an archive keeps by entry, for its whole life: a directory's
/// listing is not held (it is read twice), nor the central directory (see
/// `Central`). Names are remembered by a 64-bit hash of the full path. A regular
/// file whose name needed no change (what a user makes by the million) is one
/// 64-bit word in `plain` (the hash, its lowest bit saying whether it was given
/// or only reserved: its name on disk is the name itself): 8 bytes and a control
/// byte per slot, each table at most 7/8 full and a power of two, so 10 to 21
/// bytes an entry, and nothing that grows with a name's length. The words are
/// spread over `SHARDS` tables so that when one doubles (the old and the new one
/// held for that moment) it is a small part of the whole. Directories, names
/// that had to change and numbered names also keep the hash of their name on
/// disk, in `other` (16 bytes a slot). Two names with one hash only cost the
/// second an unneeded number.
///
/// A name is never given up once held, so numbering a taken name goes on from the
/// number after the last one it gave (`next`): a user can make a million names
/// that are all made one safe name (`___` from any three of some sixty characters),
/// and trying every number from 1 for each of them would take a CPU for days.
#[derive(Default)]
struct Names {
    plain: [std::collections::HashSet<u64, Prehashed>; SHARDS],
    other: std::collections::HashMap<u64, Slot, Prehashed>,
    /// By taken name (and whether a directory's), the first number its numbered
    /// form may have free; by that key with a directory's own name on disk, the
    /// number that directory was given (a directory met again keeps it).
    next: std::collections::HashMap<u64, u64, Prehashed>,
    /// Numbers tried, for the tests.
    #[cfg(test)]
    tried: u64,
    /// The archive's own random SipHash keys: the tables use the hashes as they
    /// are, so a user who could predict them could name a million files into one
    /// run of slots and make every lookup a long probe.
    keys: std::hash::RandomState,
    /// What the archive changed or left out.
    notes: Notes,
}

/// Entries an archive renamed, numbered or left out. The first [`LOGGED_NOTES`]
/// are logged one by one, the rest only counted (on the archive's last line): a
/// user can name a million files so that each is renamed, and a line each would
/// flood the log at every download.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Notes {
    renamed: u64,
    numbered: u64,
    left_out: u64,
}

/// Entries of one archive logged one by one.
const LOGGED_NOTES: u64 = 16;

impl Notes {
    fn total(&self) -> u64 {
        self.renamed + self.numbered + self.left_out
    }

    /// Whether the entry just counted is still logged by itself.
    fn logged(&self) -> bool {
        self.total() <= LOGGED_NOTES
    }

    /// Counts an entry renamed; whether it is logged by itself.
    fn renamed(&mut self) -> bool {
        self.renamed += 1;
        self.logged()
    }

    /// Counts an entry numbered; whether it is logged by itself.
    fn numbered(&mut self) -> bool {
        self.numbered += 1;
        self.logged()
    }

    /// Counts an entry left out; whether it is logged by itself.
    fn left_out(&mut self) -> bool {
        self.left_out += 1;
        self.logged()
    }
}

/// How many tables `Names::plain` is spread over.
const SHARDS: usize = 16;

/// The table of `Names::plain` that holds `key`: chosen by bits that neither the
/// slot (the low bits) nor the control byte (the top seven) of a table uses.
fn shard(key: u64) -> usize {
    (key >> 40) as usize % SHARDS
}

/// The tables' keys are hashes already: used as they are.
#[derive(Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl std::hash::BuildHasher for Prehashed {
    type Hasher = Prehashed;

    fn build_hasher(&self) -> Prehashed {
        Prehashed(0)
    }
}

/// A name in `Names::other`: the hash of the entry's own name on disk (its low
/// four bits dropped) and the flags below.
#[derive(Clone, Copy)]
struct Slot(u64);

impl Slot {
    const DIR: u64 = 1;
    /// Given to an entry (not only reserved by a directory's first reading).
    const CLAIMED: u64 = 2;
    /// Reserved by a name that had to change to be safe: a name that needed no
    /// change takes the reservation over.
    const CHANGED: u64 = 4;
    /// An empty directory whose entry is written: a directory met again (merged)
    /// gets no second one.
    const EMPTY: u64 = 8;
    const FLAGS: u64 = 15;

    fn new(original: u64, dir: bool, claimed: bool, changed: bool) -> Self {
        let mut v = original & !Self::FLAGS;
        for (on, flag) in [
            (dir, Self::DIR),
            (claimed, Self::CLAIMED),
            (changed, Self::CHANGED),
        ] {
            if on {
                v |= flag;
            }
        }
        Self(v)
    }

    fn original(self) -> u64 {
        self.0 & !Self::FLAGS
    }

    fn dir(self) -> bool {
        self.0 & Self::DIR != 0
    }

    fn claimed(self) -> bool {
        self.0 & Self::CLAIMED != 0
    }

    fn changed(self) -> bool {
        self.0 & Self::CHANGED != 0
    }

    fn empty(self) -> bool {
        self.0 & Self::EMPTY != 0
    }
}

/// What `Names` holds for one full name.
enum Held {
    Free,
    /// A regular file's name that needed no change; whether it was given.
    Plain(bool),
    Other(Slot),
}

/// The hash of an entry's name on disk, kept with a name that is not plain: the
/// same in every archive (never a table's key), so that which of two names that
/// collide once made safe keeps the safe name is the same in every download.
fn original_hash(bytes: &[u8]) -> u64 {
    use std::hash::Hasher as _;
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// The key of a plain name's hash in `Names::plain`.
fn plain_key(h: u64, given: bool) -> u64 {
    (h & !1) | u64::from(given)
}

impl Names {
    /// A full name's key in the tables (keyed per archive).
    fn hash(&self, bytes: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.keys, bytes)
    }

    fn held(&self, h: u64) -> Held {
        if let Some(s) = self.other.get(&h) {
            Held::Other(*s)
        } else if self.plain[shard(h)].contains(&plain_key(h, true)) {
            Held::Plain(true)
        } else if self.plain[shard(h)].contains(&plain_key(h, false)) {
            Held::Plain(false)
        } else {
            Held::Free
        }
    }

    /// Records `h` for a regular file whose name needed no change (`plain`), else
    /// as `slot`.
    fn hold(&mut self, h: u64, plain: bool, slot: Slot) {
        let table = &mut self.plain[shard(h)];
        table.remove(&plain_key(h, false));
        if plain {
            table.insert(plain_key(h, slot.claimed()));
            self.other.remove(&h);
        } else {
            // A directory given again keeps its empty entry's mark.
            let empty = self.other.get(&h).map_or(0, |s| s.0 & Slot::EMPTY);
            self.other.insert(h, Slot(slot.0 | empty));
        }
    }

    /// Reserves the name of `name`, an entry of the archive directory `parent`
    /// (empty, or ending with `/`): a name that needed no change before any that
    /// did, and among those the one whose name on disk hashes highest.
    fn reserve(&mut self, parent: &[u8], name: &std::ffi::OsStr, dir: bool) {
        let mut full = parent.to_vec();
        let changed = push_component(&mut full, name);
        let slot = Slot::new(
            original_hash(std::os::unix::ffi::OsStrExt::as_bytes(name)),
            dir,
            false,
            changed,
        );
        let h = self.hash(&full);
        let take = match self.held(h) {
            Held::Free => true,
            Held::Other(s) => {
                !s.claimed() && s.changed() && (!changed || slot.original() > s.original())
            }
            Held::Plain(_) => false,
        };
        if take {
            self.hold(h, !dir && !changed, slot);
        }
    }

    /// The full name (no trailing `/`) of `name`, an entry of the archive directory
    /// `parent` (empty, or ending with `/`); `dir` whether it is a directory.
    fn give(&mut self, parent: &[u8], name: &std::ffi::OsStr, dir: bool) -> Vec<u8> {
        let original = original_hash(std::os::unix::ffi::OsStrExt::as_bytes(name));
        let mut full = parent.to_vec();
        let changed = push_component(&mut full, name);
        let slot = Slot::new(original, dir, true, false);
        let plain = !dir && !changed;
        let h = self.hash(&full);
        let free = match self.held(h) {
            Held::Free => true,
            // Its own reservation: the same full name, unchanged, is the same name
            // on disk.
            Held::Plain(given) => plain && !given,
            // Its own reservation, or the same directory again.
            Held::Other(s) => {
                s.dir() == dir && s.original() == slot.original() && (dir || !s.claimed())
            }
        };
        if !free {
            return self.numbered(parent, full, slot);
        }
        self.hold(h, plain, slot);
        if changed && self.notes.renamed() {
            note_renamed(&full);
        }
        full
    }

    /// `full` (taken) with the first free number before its extension (a file's,
    /// not a leading dot's).
    fn numbered(&mut self, parent: &[u8], full: Vec<u8>, slot: Slot) -> Vec<u8> {
        let base = &full[parent.len()..];
        let cut = match base.iter().rposition(|b| *b == b'.') {
            Some(i) if !slot.dir() && i > 0 => i,
            _ => base.len(),
        };
        let (stem, ext) = base.split_at(cut);
        // The stem is cut to leave room for the number within `NAME_MAX` (an
        // extension too long to leave any is cut as part of the stem).
        let numbered_as = |n: u64| {
            let number = format!(" ({n})");
            let room = NAME_MAX - number.len();
            let (stem, ext) = if ext.len() > room / 2 {
                (base, &[][..])
            } else {
                (stem, ext)
            };
            let mut c = parent.to_vec();
            c.extend_from_slice(stem);
            cut_at_char(&mut c, parent.len() + room - ext.len());
            c.extend_from_slice(number.as_bytes());
            c.extend_from_slice(ext);
            c
        };
        let key = self.hash(&full) ^ u64::from(slot.dir());
        let own = key ^ slot.original() ^ 2;
        if slot.dir() {
            if let Some(n) = self.next.get(&own) {
                // The same directory, numbered before.
                return numbered_as(*n);
            }
        }
        let mut n = self.next.get(&key).copied().unwrap_or(1);
        loop {
            #[cfg(test)]
            {
                self.tried += 1;
            }
            let candidate = numbered_as(n);
            let h = self.hash(&candidate);
            match self.held(h) {
                Held::Free => {
                    self.other.insert(h, slot);
                    self.next.insert(key, n + 1);
                    if slot.dir() {
                        self.next.insert(own, n);
                    }
                    if self.notes.numbered() {
                        tracing::warn!(
                            entry = %String::from_utf8_lossy(&full),
                            written_as = %String::from_utf8_lossy(&candidate),
                            "archive entry name already given to another entry: written with a number"
                        );
                    }
                    return candidate;
                }
                // The same directory, numbered before.
                Held::Other(o) if slot.dir() && o.dir() && o.original() == slot.original() => {
                    return candidate;
                }
                _ => n += 1,
            }
        }
    }

    /// Whether the entry name `full` fits a zip header; one that does not is left
    /// out (counted, and logged while the archive's log lines last).
    fn fits(&mut self, full: &[u8]) -> bool {
        if full.len() <= MAX_NAME {
            return true;
        }
        if self.notes.left_out() {
            tracing::warn!(
                bytes = full.len(),
                "archive entry name too long for a zip header: left out"
            );
        }
        false
    }

    /// Whether the directory given the full name `full` (no trailing `/`) still
    /// needs an empty directory's entry: once, however often it is met.
    fn first_empty(&mut self, full: &[u8]) -> bool {
        let h = self.hash(full);
        match self.other.get_mut(&h) {
            Some(s) if s.empty() => false,
            Some(s) => {
                s.0 |= Slot::EMPTY;
                true
            }
            None => true,
        }
    }

    /// The full name of a path beneath the vfolder (its parents as directories).
    fn give_path(&mut self, parts: &[std::ffi::OsString], dir: bool) -> Vec<u8> {
        let mut name = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                name.push(b'/');
            }
            name = self.give(&name, part, dir || i + 1 < parts.len());
        }
        name
    }
}

/// The most files of one directory an archive holds to write them sorted by name.
const SORTED_UP_TO: usize = 1024;

/// Archives a directory's tree as the walk goes (see `fsx::walk`): regular files
/// and empty directories, nothing else; `names` is the current entry-name prefix.
struct Walker<'w, 'a> {
    w: &'w mut Writer<'a>,
    names: Vec<u8>,
    /// The prefix's length before each directory entered.
    lens: Vec<usize>,
    skip_staging: bool,
}

impl Walker<'_, '_> {
    /// The entry name of `name` in the current directory (made safe and unique, see
    /// [`Names`]; a directory's name is the same each time it is asked), or `None`
    /// (logged) when it is too long for a zip header.
    fn name(&mut self, name: &std::ffi::OsStr, dir: bool) -> Option<Vec<u8>> {
        let mut full = self.w.names.give(&self.names, name, dir);
        if dir {
            full.push(b'/');
        }
        self.w.names.fits(&full).then_some(full)
    }
}

impl fsx::Visitor for Walker<'_, '_> {
    fn entry(
        &mut self,
        dir: std::os::fd::BorrowedFd<'_>,
        e: &fsx::Entry,
        depth: usize,
    ) -> std::io::Result<bool> {
        match e.kind() {
            FileType::Directory => Ok(!(depth == 0 && self.skip_staging && e.name == ".upload")
                && self.name(&e.name, true).is_some()),
            FileType::RegularFile => {
                let Some(name) = self.name(&e.name, false) else {
                    return Ok(false);
                };
                // Gone or swapped for anything else since it was listed: left out.
                // Any other failure to open it (unreadable, descriptors exhausted, a
                // lease held on it) ends the archive as an error: the client gets a
                // broken download, never a whole-looking zip without the file.
                match fsx::child_file(dir, &e.name) {
                    Ok(file) => self.w.file(file, name)?,
                    Err(err) if fsx::is_gone(&err) => {}
                    Err(err) => {
                        return Err(fsx::unopenable(
                            "file",
                            &String::from_utf8_lossy(&name),
                            &err,
                        ))
                    }
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// The archive reserves each directory's names before writing any of them.
    fn reserves(&self) -> bool {
        true
    }

    /// The files of a directory go into the archive sorted by name, as they always
    /// did, unless it has more than this many (then in the order it is read): some
    /// 100 KiB held at most.
    fn sorted_up_to(&self) -> usize {
        SORTED_UP_TO
    }

    fn reserve(&mut self, e: &fsx::Entry) -> std::io::Result<()> {
        match e.kind() {
            FileType::Directory => self.w.names.reserve(&self.names, &e.name, true),
            FileType::RegularFile => self.w.names.reserve(&self.names, &e.name, false),
            _ => {}
        }
        Ok(())
    }

    fn enter(
        &mut self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::OsStr,
        empty: bool,
    ) -> std::io::Result<()> {
        let full = self.name(name, true).unwrap_or_default();
        self.lens.push(self.names.len());
        self.names = full;
        if empty {
            let mtime = rustix::fs::fstat(dir).map_or(0, |st| st.st_mtime);
            self.w.empty_dir(self.names.clone(), mtime)?;
        }
        Ok(())
    }

    fn leave(
        &mut self,
        _: std::os::fd::BorrowedFd<'_>,
        _: &std::ffi::OsStr,
    ) -> std::io::Result<()> {
        let len = self.lens.pop().unwrap_or(0);
        self.names.truncate(len);
        Ok(())
    }
}

/// The items an archive needs of `items` (see [`fsx::outermost`]: the listed paths of
/// a token made before listed paths were made unique at issue may repeat or nest),
/// and the device and inode of each listed directory, so that one reached through
/// another path (a symlink) is archived once too.
fn outermost(items: Vec<Item>) -> (Vec<Item>, std::collections::HashSet<(u64, u64)>) {
    let paths: Vec<Vec<std::ffi::OsString>> = items
        .iter()
        .map(|i| match i {
            Item::Beneath(_, parts) => parts.clone(),
            // Not a listed path: kept (an empty path would swallow every other).
            _ => vec![std::ffi::OsString::from("/")],
        })
        .collect();
    let keep: std::collections::HashSet<usize> = fsx::outermost(&paths).into_iter().collect();
    let mut listed = std::collections::HashSet::new();
    let items: Vec<Item> = items
        .into_iter()
        .enumerate()
        .filter(|(i, item)| keep.contains(i) || !matches!(item, Item::Beneath(..)))
        .map(|(_, item)| item)
        .collect();
    for item in &items {
        if let Item::Beneath(root, parts) = item {
            // One that cannot be opened now is dealt with at its turn.
            if let Ok(st) =
                fsx::open_readable(root.as_fd(), parts).and_then(|fd| Ok(rustix::fs::fstat(&fd)?))
            {
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    listed.insert((st.st_dev, st.st_ino));
                }
            }
        }
    }
    (items, listed)
}

/// The central directory as it is made: its records go to an unlinked temporary
/// file in `TMPDIR` (through a small buffer) rather than memory, since a user with
/// a shell can make a million empty files in seconds and open many archives of
/// them; `finish` streams them back. Created before the archive's first byte (an
/// archive that cannot have one is refused with an error status), closed (and so
/// freed) with the writer however the archive ends. It grows no faster than the
/// client reads: each record follows the entry's header and data, sent first.
struct Central {
    file: std::io::BufWriter<std::fs::File>,
    /// Its records.
    count: u64,
    /// Its bytes.
    size: u64,
    /// One record being encoded.
    record: Vec<u8>,
}

impl Central {
    /// An empty directory in a new temporary file.
    fn new() -> std::io::Result<Self> {
        let file = tempfile::tempfile().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("no temporary file for the archive's central directory: {e}"),
            )
        })?;
        Ok(Self {
            file: std::io::BufWriter::with_capacity(CENTRAL_CHUNK, file),
            count: 0,
            size: 0,
            record: Vec::new(),
        })
    }
}

/// The buffer of the central directory's file, and the chunks `finish` reads it in.
const CENTRAL_CHUNK: usize = 64 * 1024;

/// The general-purpose flags of an entry: a data descriptor only after a deflate
/// stream (see [`Writer::local_header`]).
fn flags(deflate: bool) -> u16 {
    if deflate {
        FLAG_UTF8 | FLAG_DESCRIPTOR
    } else {
        FLAG_UTF8
    }
}

struct Writer<'a> {
    tx: &'a mpsc::Sender<std::io::Result<Bytes>>,
    offset: u64,
    central: Central,
    buf: Vec<u8>,
    /// Entries at least this large use zip64 (the classic limit; lower in tests).
    zip64_from: u64,
    /// How long a chunk may wait for the client to take bytes.
    stall: Duration,
    /// The names given so far.
    names: Names,
    /// The bytes given to deflate so far (trials included), held to
    /// [`DEFLATE_RATIO`] times the bytes sent plus [`DEFLATE_SLACK`].
    deflated: u64,
    /// The stream as its slot sees it: told what is sent, and cut through it to
    /// make room for another archive ([`crate::archive_slots`]).
    watch: Option<Arc<crate::archive_slots::Streaming>>,
}

impl<'a> Writer<'a> {
    /// A writer whose central directory has its temporary file: made before the
    /// archive's first byte, so an archive that cannot have one is refused with an
    /// error status instead of being cut off.
    fn new(
        tx: &'a mpsc::Sender<std::io::Result<Bytes>>,
        zip64_from: u64,
        stall: Duration,
    ) -> std::io::Result<Self> {
        Ok(Self {
            tx,
            offset: 0,
            central: Central::new()?,
            buf: vec![0u8; 64 * 1024],
            zip64_from,
            stall,
            names: Names::default(),
            deflated: 0,
            watch: None,
        })
    }

    /// Whether `n` more bytes may be given to deflate ([`DEFLATE_RATIO`]): counted
    /// when they may.
    fn may_deflate(&mut self, n: usize) -> bool {
        let allowed = self
            .offset
            .saturating_mul(DEFLATE_RATIO)
            .saturating_add(DEFLATE_SLACK);
        let after = self.deflated.saturating_add(n as u64);
        if after > allowed {
            return false;
        }
        self.deflated = after;
        true
    }

    /// Hands a chunk to the response body, waiting at most `stall` for room.
    fn send(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        let cut = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client kept the archive waiting while every archive slot was wanted: cut to make room for another",
            )
        };
        if self.watch.as_ref().is_some_and(|w| w.is_cut()) {
            return Err(cut());
        }
        self.offset += bytes.len() as u64;
        let chunk = Ok(Bytes::from(bytes));
        let sent = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let send = tokio::time::timeout(self.stall, self.tx.send(chunk));
                match &self.watch {
                    Some(w) => {
                        // Only a wait on the client counts: room for the chunk is
                        // there at once while it takes the bytes.
                        w.waiting();
                        let sent = rt.block_on(async {
                            tokio::select! {
                                sent = send => Some(sent),
                                () = w.cut_off() => None,
                            }
                        });
                        w.waited();
                        sent
                    }
                    None => Some(rt.block_on(send)),
                }
                .ok_or_else(cut)?
            }
            Err(_) => Ok(self.tx.blocking_send(chunk)),
        };

        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::other("client went away")),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took no bytes for {} s", self.stall.as_secs()),
            )),
        }
    }

    /// The local header of an entry. A `deflate` entry's CRC and sizes follow its
    /// data in a descriptor (its deflate stream ends by itself, so no reader needs
    /// them first); any other entry has no data (method 0, CRC and sizes zero here,
    /// no descriptor): a method-0 entry with a descriptor would end at the first
    /// `PK\x07\x08` in its data for a streaming reader.
    fn local_header(
        &mut self,
        name: &[u8],
        stamp: DosStamp,
        zip64: bool,
        deflate: bool,
    ) -> std::io::Result<()> {
        let mut h = Vec::with_capacity(50 + name.len());
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&(if zip64 { 45u16 } else { 20 }).to_le_bytes()); // version needed
        h.extend_from_slice(&flags(deflate).to_le_bytes());
        h.extend_from_slice(&(if deflate { 8u16 } else { 0 }).to_le_bytes()); // method
        h.extend_from_slice(&stamp.time.to_le_bytes());
        h.extend_from_slice(&stamp.date.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // crc: in the descriptor, or none
        let sizes = if zip64 { u32::MAX } else { 0 };
        h.extend_from_slice(&sizes.to_le_bytes());
        h.extend_from_slice(&sizes.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&(if zip64 { 20u16 } else { 0 }).to_le_bytes());
        h.extend_from_slice(name);
        if zip64 {
            h.extend_from_slice(&1u16.to_le_bytes());
            h.extend_from_slice(&16u16.to_le_bytes());
            h.extend_from_slice(&[0u8; 16]); // sizes: in the descriptor
        }
        self.send(h)
    }

    fn descriptor(&mut self, crc: u32, csize: u64, size: u64, zip64: bool) -> std::io::Result<()> {
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
        d.extend_from_slice(&crc.to_le_bytes());
        if zip64 {
            d.extend_from_slice(&csize.to_le_bytes());
            d.extend_from_slice(&size.to_le_bytes());
        } else {
            d.extend_from_slice(&(csize as u32).to_le_bytes());
            d.extend_from_slice(&(size as u32).to_le_bytes());
        }
        self.send(d)
    }

    fn empty_dir(&mut self, name: Vec<u8>, mtime: i64) -> std::io::Result<()> {
        // A directory met again (listed twice, listed and under a listed parent).
        if !self
            .names
            .first_empty(name.strip_suffix(b"/").unwrap_or(&name))
        {
            return Ok(());
        }
        let offset = self.offset;
        // No data: its sizes (zero) are in the header, and it has no descriptor.
        let stamp = dos_stamp(mtime);
        self.local_header(&name, stamp, false, false)?;
        self.record(&Entry {
            name: &name,
            crc: 0,
            size: 0,
            csize: 0,
            offset,
            mode: 0o040_755,
            stamp,
            zip64: false,
            deflate: false,
        })
    }

    /// Writes `file`'s entry: at most the size `fstat` gives now, which decided its
    /// method (a file mostly holes is never deflated) and its format (zip64 or
    /// not). A file can change while it is read: its user can grow it after the
    /// decision (`truncate -s 3900M` on a dense file whose start compresses), which
    /// had the proxy deflate gigabytes of zeros, or grow it past 4 GiB, which cut
    /// every archive holding it; bytes past that size are not read. A file that
    /// shrinks meanwhile is what was read of it: the entry's CRC and sizes are
    /// always those of the bytes it holds.
    fn file(&mut self, file: std::fs::File, name: Vec<u8>) -> std::io::Result<()> {
        let meta = file.metadata()?;
        use std::os::unix::fs::PermissionsExt as _;
        // The type and permission bits, never set-user-ID, set-group-ID or sticky:
        // extractors that restore modes (libarchive's bsdtar run as root does by
        // default, `unzip -K`) would make a vfolder user's program set-user-ID to
        // whoever extracts it, root included (the zip says no owner: files are
        // the extractor's). A clone copies `rwx` bits only, likewise.
        let mode = meta.permissions().mode() & !0o7000;
        let mostly_holes = {
            use std::os::unix::fs::MetadataExt as _;
            meta.blocks().saturating_mul(512) < meta.len() / 2
        };
        let mut buf = std::mem::take(&mut self.buf);
        let mut file = file.take(meta.len());
        let stamp = {
            use std::os::unix::fs::MetadataExt as _;
            dos_stamp(meta.mtime())
        };
        let result = self.file_body(
            &mut file,
            name,
            (meta.len(), stamp),
            mode,
            !mostly_holes,
            &mut buf,
        );
        self.buf = buf;
        result
    }

    fn file_body(
        &mut self,
        file: &mut impl std::io::Read,
        name: Vec<u8>,
        (len, stamp): (u64, DosStamp),
        mode: u32,
        may_deflate: bool,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        // The first block decides the method before the header goes out.
        let mut first = 0;
        while first < buf.len() {
            match file.read(&mut buf[first..])? {
                0 => break,
                n => first += n,
            }
        }
        // Compressed, or in stored blocks (`None`): method 8 either way.
        let mut deflater =
            (may_deflate && self.may_deflate(first) && compresses(&buf[..first])).then(compressor);
        // Either stream can end up a little larger than the file.
        let zip64 = len >= self.zip64_from.saturating_sub(DEFLATE_MARGIN);
        let offset = self.offset;
        self.local_header(&name, stamp, zip64, true)?;
        let mut crc = crc32fast::Hasher::new();
        let (mut size, mut csize) = (0u64, 0u64);
        let mut n = first;
        let mut out = Vec::with_capacity(buf.len());
        loop {
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            size += n as u64;
            out.clear();
            if deflater.is_some() && !self.may_deflate(n) {
                // Deflated far better than any file of data does, for long enough
                // to pass the archive's ratio: the rest goes in stored blocks, in
                // the same deflate stream. A sync flush ends the deflated blocks on
                // a byte boundary, where a stored block may begin.
                if let Some(mut c) = deflater.take() {
                    deflate_into(&mut c, &[], TDEFLFlush::Sync, &mut out)?;
                }
            }
            match deflater.as_mut() {
                Some(c) => deflate_into(c, &buf[..n], TDEFLFlush::None, &mut out)?,
                None => stored_blocks(&buf[..n], &mut out),
            }
            csize += out.len() as u64;
            if !zip64 && (size > LIMIT || csize > LIMIT) {
                // Past the classic limit without zip64 (no more than the size at
                // open is read, so only what deflate adds could take it there):
                // never corrupt.
                return Err(std::io::Error::other(
                    "an entry passed 4 GiB without zip64 while archived",
                ));
            }
            if !out.is_empty() {
                self.send(std::mem::take(&mut out))?;
            }
            n = file.read(buf)?;
        }
        out.clear();
        match deflater.as_mut() {
            Some(c) => deflate_into(c, &[], TDEFLFlush::Finish, &mut out)?,
            None => out.extend_from_slice(&STORED_END),
        }
        csize += out.len() as u64;
        if !zip64 && csize > LIMIT {
            return Err(std::io::Error::other(
                "an entry passed 4 GiB without zip64 while archived",
            ));
        }
        self.send(out)?;
        let crc = crc.finalize();
        self.descriptor(crc, csize, size, zip64)?;
        self.record(&Entry {
            name: &name,
            crc,
            size,
            csize,
            offset,
            mode,
            stamp,
            zip64,
            deflate: true,
        })
    }

    fn archive(&mut self, items: Vec<Item>, skip_staging: bool) -> std::io::Result<()> {
        let (items, listed) = outermost(items);
        // Listed directories already archived, by device and inode.
        let mut walked = std::collections::HashSet::new();
        // What the climbs from listed directories may still take (see
        // `fsx::CLIMB_BUDGET`).
        let mut climbs = fsx::Climbs::default();
        // The staging check of the listed paths' vfolder, made at the first.
        let mut staging: Option<StagingCheck> = None;
        for item in items {
            // Whether this item's walk leaves out the staging area at its top.
            let mut skip_staging = skip_staging;
            let item = match item {
                Item::Beneath(root, parts) => {
                    // Checked before the answer began, but opened only now: an entry
                    // removed or replaced by a special file meanwhile is left out,
                    // as a walk leaves it out, rather than cutting the archive; any
                    // other failure to open it cuts the archive. So is one that
                    // reaches the staging area now (a symlink swapped in meanwhile):
                    // other users' uploads in progress are never archived.
                    let top = fsx::dir_identity(root.as_fd())?;
                    let check = match &mut staging {
                        Some(check) if check.top() == top => check,
                        slot => slot.insert(StagingCheck::new(root.as_fd())?),
                    };
                    let opened = fsx::locate(root.as_fd(), &parts).and_then(|located| {
                        if check.reaches_staging(&located)? {
                            return Ok(None);
                        }
                        fsx::open_located(root.as_fd(), located).map(Some)
                    });
                    let fd = match opened {
                        Ok(Some(fd)) => fd,
                        Ok(None) => {
                            if self.names.notes.left_out() {
                                tracing::warn!(
                                    entry = %fsx::join(&parts).to_string_lossy(),
                                    "listed entry reaches the staging area: left out of the archive"
                                );
                            }
                            continue;
                        }
                        Err(e) if fsx::is_gone(&e) => {
                            if self.names.notes.left_out() {
                                tracing::warn!(
                                    entry = %fsx::join(&parts).to_string_lossy(),
                                    error = %e,
                                    "listed entry gone before its turn: left out of the archive"
                                );
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let st = rustix::fs::fstat(&fd)?;
                    let dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                    if dir {
                        let id = (st.st_dev, st.st_ino);
                        let top = fsx::dir_identity(root.as_fd())?;
                        // A directory listed again through another path (a symlink),
                        // or inside another listed one, is archived by that one.
                        let inside = match fsx::inside_any(fd.as_fd(), &listed, top, &mut climbs) {
                            Ok(inside) => inside,
                            // Spent on a user's deep chains: the archive ends here.
                            Err(e) if fsx::carried::<fsx::TooDeep>(&e).is_some() => return Err(e),
                            Err(_) => false,
                        };
                        if walked.contains(&id) || inside {
                            tracing::debug!(
                                entry = %fsx::join(&parts).to_string_lossy(),
                                "listed directory archived already by another listed path"
                            );
                            continue;
                        }
                        walked.insert(id);
                        // The vfolder itself (through a symlink to it): its staging
                        // area is left out, as a download of the vfolder leaves it.
                        skip_staging |= id == top;
                    }
                    let mut name = self.names.give_path(&parts, dir);
                    if dir {
                        name.push(b'/');
                    }
                    if !self.names.fits(&name) {
                        continue;
                    }
                    if dir {
                        Item::Dir(fd, name)
                    } else {
                        Item::File(std::fs::File::from(fd), name)
                    }
                }
                other => other,
            };
            match item {
                Item::File(f, name) => self.file(f, name)?,
                Item::Beneath(..) => {}
                Item::Dir(fd, prefix) => {
                    let mut walker = Walker {
                        w: self,
                        names: prefix,
                        lens: Vec::new(),
                        skip_staging,
                    };
                    if !walker.names.is_empty() && fsx::is_empty(fd.as_fd())? {
                        let mtime = rustix::fs::fstat(&fd).map_or(0, |st| st.st_mtime);
                        walker.w.empty_dir(walker.names.clone(), mtime)?;
                    }
                    fsx::walk(fd.as_fd(), &mut walker)?;
                }
            }
        }
        self.finish()
    }

    /// Encodes `e`'s central directory record and appends it to the central
    /// directory's file. No temporary file (a full or read-only temporary directory)
    /// fails the archive: the response is cut off, as on any error.
    fn record(&mut self, e: &Entry<'_>) -> std::io::Result<()> {
        let big_size = e.zip64 || e.size >= LIMIT || e.csize >= LIMIT;
        let big_offset = e.offset >= LIMIT;
        let mut extra = Vec::new();
        if big_size {
            extra.extend_from_slice(&e.size.to_le_bytes());
            extra.extend_from_slice(&e.csize.to_le_bytes());
        }
        if big_offset {
            extra.extend_from_slice(&e.offset.to_le_bytes());
        }
        let zip64 = !extra.is_empty();
        let version: u16 = if zip64 { 45 } else { 20 };
        let cd = &mut self.central.record;
        cd.clear();
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&(0x0300u16 | version).to_le_bytes()); // made by: Unix
        cd.extend_from_slice(&version.to_le_bytes());
        cd.extend_from_slice(&flags(e.deflate).to_le_bytes());
        cd.extend_from_slice(&(if e.deflate { 8u16 } else { 0 }).to_le_bytes());
        cd.extend_from_slice(&e.stamp.time.to_le_bytes());
        cd.extend_from_slice(&e.stamp.date.to_le_bytes());
        cd.extend_from_slice(&e.crc.to_le_bytes());
        let (csize32, size32) = if big_size {
            (u32::MAX, u32::MAX)
        } else {
            (e.csize as u32, e.size as u32)
        };
        cd.extend_from_slice(&csize32.to_le_bytes());
        cd.extend_from_slice(&size32.to_le_bytes());
        cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        let extra_len = if zip64 { extra.len() + 4 } else { 0 };
        cd.extend_from_slice(&(extra_len as u16).to_le_bytes());
        cd.extend_from_slice(&[0u8; 6]); // comment, disk, internal attributes
        let dos_dir = if e.name.ends_with(b"/") { 0x10 } else { 0 };
        cd.extend_from_slice(&((e.mode << 16) | dos_dir).to_le_bytes());
        let offset32 = if big_offset {
            u32::MAX
        } else {
            e.offset as u32
        };
        cd.extend_from_slice(&offset32.to_le_bytes());
        cd.extend_from_slice(e.name);
        if zip64 {
            cd.extend_from_slice(&1u16.to_le_bytes());
            cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&extra);
        }
        std::io::Write::write_all(&mut self.central.file, &self.central.record)?;
        self.central.count += 1;
        self.central.size += self.central.record.len() as u64;
        Ok(())
    }

    /// Streams the central directory back from its file, in chunks sent as any
    /// others (waiting for the client as they do), then the end records, which need
    /// only the count, size and offset of the directory.
    fn finish(&mut self) -> std::io::Result<()> {
        let cd_offset = self.offset;
        let cd_size = self.central.size;
        let count = self.central.count;
        std::io::Write::flush(&mut self.central.file)?;
        std::io::Seek::seek(self.central.file.get_mut(), std::io::SeekFrom::Start(0))?;
        let mut left = cd_size;
        while left > 0 {
            let mut chunk = vec![0u8; left.min(CENTRAL_CHUNK as u64) as usize];
            self.central.file.get_mut().read_exact(&mut chunk)?;
            left -= chunk.len() as u64;
            self.send(chunk)?;
        }
        let mut cd = Vec::new();
        let zip64_end = count >= 0xFFFF || cd_offset >= LIMIT || cd_size >= LIMIT;
        if zip64_end {
            let record = cd_offset + cd_size;
            cd.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            cd.extend_from_slice(&44u64.to_le_bytes());
            cd.extend_from_slice(&(0x0300u16 | 45).to_le_bytes());
            cd.extend_from_slice(&45u16.to_le_bytes());
            cd.extend_from_slice(&[0u8; 8]); // this disk, the directory's disk
            cd.extend_from_slice(&count.to_le_bytes());
            cd.extend_from_slice(&count.to_le_bytes());
            cd.extend_from_slice(&cd_size.to_le_bytes());
            cd.extend_from_slice(&cd_offset.to_le_bytes());
            cd.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            cd.extend_from_slice(&0u32.to_le_bytes());
            cd.extend_from_slice(&record.to_le_bytes());
            cd.extend_from_slice(&1u32.to_le_bytes());
        }
        let count16 = count.min(0xFFFF) as u16;
        cd.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        cd.extend_from_slice(&[0u8; 4]);
        cd.extend_from_slice(&count16.to_le_bytes());
        cd.extend_from_slice(&count16.to_le_bytes());
        cd.extend_from_slice(&(cd_size.min(LIMIT) as u32).to_le_bytes());
        cd.extend_from_slice(&(cd_offset.min(LIMIT) as u32).to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        self.send(cd)?;
        let notes = self.names.notes;
        if notes.total() > LOGGED_NOTES {
            tracing::warn!(
                not_logged = notes.total() - LOGGED_NOTES,
                renamed = notes.renamed,
                numbered = notes.numbered,
                left_out = notes.left_out,
                "archive entries renamed, numbered or left out past the first {LOGGED_NOTES}: counted, not logged one by one"
            );
        }
        tracing::info!(
            files = count,
            bytes = self.offset,
            renamed = notes.renamed,
            numbered = notes.numbered,
            left_out = notes.left_out,
            "archive streamed"
        );
        Ok(())
    }
}

#[cfg(test)]
mod stamp_tests {
    use super::{dos_stamp, DosStamp};

    #[test]
    fn dos_stamps() {
        let at = |y: u16, mo: u16, d: u16, h: u16, mi: u16, s: u16| DosStamp {
            time: (h << 11) | (mi << 5) | (s / 2),
            date: ((y - 1980) << 9) | (mo << 5) | d,
        };
        for (mtime, want) in [
            (0, at(1980, 1, 1, 0, 0, 0)),
            (-5, at(1980, 1, 1, 0, 0, 0)),
            (315_532_800, at(1980, 1, 1, 0, 0, 0)),
            // 2026-12-07 18:30:45 UTC: to the even second below.
            (1_796_668_245, at(2026, 12, 7, 18, 30, 44)),
            // 2000-02-29 23:59:59 (a leap day of a leap century).
            (951_868_799, at(2000, 2, 29, 23, 59, 58)),
            (4_354_819_198, at(2107, 12, 31, 23, 59, 58)),
            (i64::MAX, at(2107, 12, 31, 23, 59, 58)),
        ] {
            assert_eq!(dos_stamp(mtime), want, "{mtime}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes an archive of `dir` with zip64 from `zip64_from` bytes, into memory.
    fn archive(dir: &std::path::Path, zip64_from: u64) -> Vec<u8> {
        let (tx, mut rx) = mpsc::channel(4);
        let fd = rustix::fs::open(dir, fsx::DIR, rustix::fs::Mode::empty()).expect("open");
        let writer = std::thread::spawn(move || {
            Writer::new(&tx, zip64_from, Duration::from_secs(60))?
                .archive(vec![Item::Dir(fd, Vec::new())], false)
        });
        let mut out = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            out.extend_from_slice(&chunk.expect("chunk"));
        }
        writer.join().expect("writer").expect("archive");
        out
    }

    /// Python's zipfile checks every CRC and lists the names.
    fn python_lists(zip: &[u8]) -> String {
        python_on(zip, "import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nprint('|'.join(sorted(z.namelist())))\nprint(sum(len(z.read(n)) for n in z.namelist()))")
    }

    /// What Python's `script` prints given the archive `zip` as a file (`sys.argv[1]`).
    fn python_on(zip: &[u8], script: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.zip"), zip).expect("zip");
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(dir.path().join("a.zip"))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    #[test]
    fn classic_and_zip64_entries_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("sub/empty")).expect("tree");
        std::fs::write(dir.path().join("a.txt"), "alpha").expect("a");
        std::fs::write(dir.path().join("sub/b.bin"), vec![7u8; 100_000]).expect("b");
        // Incompressible bytes (a xorshift stream) stay stored.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(dir.path().join("noise.bin"), &noise).expect("noise");
        for zip64_from in [LIMIT, 0] {
            let zip = archive(dir.path(), zip64_from);
            let text = python_lists(&zip);
            assert_eq!(
                text, "a.txt|noise.bin|sub/b.bin|sub/empty/\n300005\n",
                "{zip64_from}"
            );
            assert!(
                zip.len() < 200_000 + 20_000,
                "b.bin was deflated: {}",
                zip.len()
            );
            assert!(zip.len() > 200_000, "noise.bin was stored: {}", zip.len());
        }
    }

    /// A sparse file (holes, no disk) is stored, not deflated: deflating its zeros
    /// cost a CPU-second for each megabyte the archive sent. The same zeros written
    /// out are deflated as before, up to the archive's deflate ratio (a MiB is within
    /// its slack; see `zeros_are_deflated_no_more_than_the_ratio_allows`).
    #[test]
    fn files_mostly_holes_are_stored_and_written_zeros_deflated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sparse = std::fs::File::create(dir.path().join("sparse.bin")).expect("sparse");
        sparse.set_len(4 << 20).expect("holes");
        std::fs::write(dir.path().join("zeros.bin"), vec![0u8; 1 << 20]).expect("zeros");
        let zip = archive(dir.path(), LIMIT);
        assert_eq!(python_lists(&zip), "sparse.bin|zeros.bin\n5242880\n");
        // The sparse file's 4 MiB went out as they are; the written zeros deflated.
        assert!(zip.len() > 4 << 20, "sparse.bin was stored: {}", zip.len());
        assert!(
            zip.len() < (4 << 20) + (64 << 10),
            "zeros.bin was deflated: {}",
            zip.len()
        );
    }

    /// Zeros in allocated blocks (`fallocate`: not "mostly holes", every read zeros)
    /// deflate about 1,000:1: an archive read and deflated some 200 bytes for each
    /// it sent. Past `DEFLATE_RATIO` bytes given to deflate for each sent (beyond
    /// the slack), the rest goes in stored blocks of the same deflate stream: the
    /// archive sends at least its file's size over the ratio, and reads back whole.
    /// Text before and after the zeros is deflated as ever.
    #[test]
    fn zeros_are_deflated_no_more_than_the_ratio_allows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size: u64 = 64 << 20;
        let zeros = std::fs::File::create(dir.path().join("b-zeros.bin")).expect("zeros");
        if rustix::fs::fallocate(&zeros, rustix::fs::FallocateFlags::empty(), 0, size).is_err() {
            // No `fallocate` here: the zeros written out are the same case.
            std::io::Write::write_all(&mut &zeros, &vec![0u8; size as usize]).expect("write");
        }
        {
            use std::os::unix::fs::MetadataExt as _;
            let meta = zeros.metadata().expect("meta");
            assert!(meta.blocks() * 512 >= size, "allocated: {}", meta.blocks());
        }
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("{i},row {i},{}\n", i * 7).into_bytes())
            .collect();
        std::fs::write(dir.path().join("a.csv"), &text).expect("a");
        std::fs::write(dir.path().join("c.csv"), &text).expect("c");
        let zip = archive(dir.path(), LIMIT);
        let want = size + 2 * text.len() as u64;
        assert_eq!(
            python_lists(&zip),
            format!("a.csv|b-zeros.bin|c.csv\n{want}\n")
        );
        // Every 20 bytes deflated sent at least one, beyond the slack (and the
        // last 64 KiB read before the ratio was checked).
        let sent = zip.len() as u64;
        assert!(
            sent * DEFLATE_RATIO + DEFLATE_SLACK + (64 << 10) >= want,
            "{sent} bytes sent for {want} read"
        );
        // Before, 64 MiB of zeros deflated to some 64 KB.
        assert!(sent > size / (DEFLATE_RATIO + 1), "{sent}");
        // The text files deflated: the first within the slack, the last because
        // the stored zeros sent allow it.
        assert!(sent < size + text.len() as u64, "{sent}");
        let deflated = python_sizes(&zip);
        assert!(deflated.contains("a.csv deflated"), "{deflated}");
        assert!(deflated.contains("c.csv deflated"), "{deflated}");
    }

    /// Each entry's name and whether its data deflated to less than half its size.
    fn python_sizes(zip: &[u8]) -> String {
        python_on(zip, "import sys,zipfile\nfor i in zipfile.ZipFile(sys.argv[1]).infolist(): print(i.filename, 'deflated' if i.compress_size * 2 < i.file_size else 'stored')")
    }

    /// Names that are all made one safe name are numbered 1, 2, 3, … each trying
    /// one number, not every number from 1: a user can make a million of them.
    /// A directory met again keeps its number.
    #[test]
    fn numbering_many_names_made_one_tries_each_number_once() {
        use std::os::unix::ffi::OsStrExt as _;
        const N: u64 = 3_000;
        let mut names = Names::default();
        let mut alphabet: Vec<Vec<u8>> = vec![b"\\".to_vec(), b":".to_vec()];
        alphabet.extend((1u8..0x20).map(|b| vec![b]));
        let mut given = 0u64;
        'all: for a in &alphabet {
            for b in &alphabet {
                for c in &alphabet {
                    if given == N {
                        break 'all;
                    }
                    let name = [a.as_slice(), b, c, b".txt"].concat();
                    let full = names.give(b"w/", std::ffi::OsStr::from_bytes(&name), false);
                    let want = match given {
                        0 => "w/___.txt".to_owned(),
                        n => format!("w/___ ({n}).txt"),
                    };
                    assert_eq!(String::from_utf8_lossy(&full), want);
                    given += 1;
                }
            }
        }
        assert_eq!(given, N);
        assert!(names.tried < 2 * N, "{} numbers tried", names.tried);
        // Directories: one met again keeps its number.
        let d = std::ffi::OsStr::from_bytes(b"d:");
        for dir in [b"d_".as_slice(), b"d\\", b"d:", b"d\x01"] {
            names.give(b"w/", std::ffi::OsStr::from_bytes(dir), true);
        }
        assert_eq!(names.give(b"w/", d, true), b"w/d_ (2)");
        assert_eq!(
            names.give(b"w/", std::ffi::OsStr::from_bytes(b"d\x02"), true),
            b"w/d_ (4)"
        );
        assert_eq!(names.give(b"w/", d, true), b"w/d_ (2)");
    }

    /// A name that needed no change keeps it in every directory of the archive,
    /// not only at its top: each directory entered has its names reserved under
    /// its own prefix before its entries are written.
    #[test]
    fn names_that_needed_no_change_keep_them_in_every_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("sub/deeper")).expect("tree");
        for (name, content) in [
            ("sub/a\\b.txt", "backslash"),
            ("sub/a_b.txt", "plain"),
            ("sub/deeper/x:y", "colon"),
            ("sub/deeper/x_y", "plain too"),
        ] {
            std::fs::write(dir.path().join(name), content).expect("file");
        }
        let zip = archive(dir.path(), LIMIT);
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a.zip"), &zip).expect("zip");
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nfor n in sorted(z.namelist()): print(n, z.read(n).decode())")
            .arg(tmp.path().join("a.zip"))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "sub/a_b (1).txt backslash\nsub/a_b.txt plain\nsub/deeper/x_y plain too\nsub/deeper/x_y (1) colon\n"
        );
    }
}
