//! Archives as a streaming extractor reads them (`curl URL | bsdtar -xf -`, Windows
//! `tar.exe`): from the first local header on, each entry ending where its own data
//! says, the central directory never consulted. A vfolder user's file that holds a
//! forged data descriptor and forged local headers must come out as that one file,
//! byte for byte, and nothing else: never as extra entries (a set-user-ID program,
//! a symlink to `/etc/shadow`) that only such a reader sees. Checked with a
//! streaming reader written here (which ends an entry with no length of its own at
//! the first data descriptor signature whose CRC and size match, as libarchive
//! does), with `bsdtar` reading a pipe when it is installed, and with Python's
//! `zipfile` and `unzip -t` (readers of the central directory) for the archive's
//! validity.

mod storage_common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use storage_common::{create_folder, incompressible, Proxy, VFID};

fn le16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("cut off at {at}"))
}

fn le32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("cut off at {at}"))
}

fn le64(b: &[u8], at: usize) -> Result<u64, String> {
    Ok(u64::from(le32(b, at)?) | u64::from(le32(b, at + 4)?) << 32)
}

/// A local file header whose entry is `data`, stored with its sizes in the header,
/// as a user can write one into a file; with `mode`, libarchive's `xl` extra field
/// giving Unix attributes (it restores them: set-user-ID, symlink).
fn forged_header(name: &[u8], data: &[u8], mode: Option<u32>) -> Vec<u8> {
    let mut extra = Vec::new();
    if let Some(mode) = mode {
        extra.extend_from_slice(&0x6c78u16.to_le_bytes());
        extra.extend_from_slice(&7u16.to_le_bytes());
        extra.push(0x05); // bitmap: version made by, external attributes
        extra.extend_from_slice(&(3u16 << 8).to_le_bytes()); // made by Unix
        extra.extend_from_slice(&(mode << 16).to_le_bytes());
    }
    let crc = crc32fast::hash(data);
    let mut h = Vec::new();
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // flags: none
    h.extend_from_slice(&0u16.to_le_bytes()); // stored
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0x21u16.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    h.extend_from_slice(name);
    h.extend_from_slice(&extra);
    h.extend_from_slice(data);
    h
}

/// `prefix`, then a data descriptor that matches it (signature, CRC, sizes), then
/// forged entries: a set-user-ID root shell script and a symlink to `/etc/shadow`.
fn smuggling(prefix: &[u8]) -> Vec<u8> {
    let mut f = prefix.to_vec();
    f.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(prefix).to_le_bytes());
    f.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
    f.extend_from_slice(&(prefix.len() as u32).to_le_bytes());
    f.extend_from_slice(&forged_header(
        b"SMUGGLED_not_in_archive.sh",
        b"#!/bin/sh\necho smuggled entry ran as $(id -un)\n",
        Some(0o104_755),
    ));
    f.extend_from_slice(&forged_header(
        b"escape_link",
        b"/etc/shadow",
        Some(0o120_777),
    ));
    f
}

/// Inflates the raw deflate stream at the start of `input` until it ends: what it
/// holds, and how many bytes of `input` it took.
fn inflate(input: &[u8]) -> Result<(Vec<u8>, usize), String> {
    use miniz_oxide::inflate::stream::{inflate, InflateState};
    use miniz_oxide::{DataFormat, MZFlush, MZStatus};
    let mut state = InflateState::new_boxed(DataFormat::Raw);
    let (mut out, mut used) = (Vec::new(), 0usize);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let r = inflate(&mut state, &input[used..], &mut chunk, MZFlush::None);
        used += r.bytes_consumed;
        out.extend_from_slice(&chunk[..r.bytes_written]);
        match r.status {
            Ok(MZStatus::StreamEnd) => return Ok((out, used)),
            Ok(_) if r.bytes_consumed > 0 || r.bytes_written > 0 => {}
            other => return Err(format!("deflate stream broken or cut off: {other:?}")),
        }
    }
}

/// The entries of `zip` as a streaming extractor finds them, in order: from the
/// first local header, each entry's data ended by its deflate stream (method 8) or
/// its sizes in the header (method 0 without a descriptor); a method-0 entry with a
/// data descriptor (no length before its data) at the first `PK\x07\x08` followed by
/// the CRC and size of the bytes before it, as libarchive's streaming reader ends
/// it. Each entry's CRC and sizes are checked against its descriptor or header.
fn stream_entries(zip: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    loop {
        match le32(zip, at)? {
            0x0403_4b50 => {}
            // The central directory or the end records: no more entries.
            0x0201_4b50 | 0x0606_4b50 | 0x0605_4b50 => return Ok(entries),
            sig => {
                let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
                return Err(format!(
                    "no header at {at} ({sig:#x}) after the entries {names:?}"
                ));
            }
        }
        let flags = le16(zip, at + 6)?;
        let method = le16(zip, at + 8)?;
        let (crc, csize, size) = (
            le32(zip, at + 14)?,
            le32(zip, at + 18)?,
            le32(zip, at + 22)?,
        );
        let name_len = usize::from(le16(zip, at + 26)?);
        let extra_len = usize::from(le16(zip, at + 28)?);
        let name = zip
            .get(at + 30..at + 30 + name_len)
            .ok_or("name cut off")?
            .to_vec();
        let extra = zip
            .get(at + 30 + name_len..at + 30 + name_len + extra_len)
            .ok_or("extra field cut off")?;
        // A zip64 extra field: the descriptor's sizes are 8 bytes each.
        let (mut zip64, mut pos) = (false, 0usize);
        while pos + 4 <= extra.len() {
            zip64 |= le16(extra, pos)? == 1;
            pos += 4 + usize::from(le16(extra, pos + 2)?);
        }
        let start = at + 30 + name_len + extra_len;
        let descriptor = flags & 8 != 0;
        let (data, end) = match (method, descriptor) {
            (8, _) => {
                let (data, used) = inflate(&zip[start..])?;
                (data, start + used)
            }
            (0, false) => {
                let end = start + csize as usize;
                (zip.get(start..end).ok_or("data cut off")?.to_vec(), end)
            }
            (0, true) => {
                // Nothing says where the data ends: the first descriptor that fits.
                let mut end = start;
                loop {
                    let here = zip.get(start..end).ok_or("no data descriptor")?;
                    if zip.get(end..end + 4) == Some(b"PK\x07\x08")
                        && le32(zip, end + 4)? == crc32fast::hash(here)
                        && le32(zip, end + 12)? as usize == here.len()
                    {
                        break (here.to_vec(), end);
                    }
                    end += 1;
                }
            }
            (m, _) => return Err(format!("method {m}")),
        };
        at = end;
        let (crc, csize, size) = if descriptor {
            if le32(zip, at)? == 0x0807_4b50 {
                at += 4;
            }
            let crc = le32(zip, at)?;
            let sizes = if zip64 {
                at += 20;
                (le64(zip, at - 16)?, le64(zip, at - 8)?)
            } else {
                at += 12;
                (u64::from(le32(zip, at - 8)?), u64::from(le32(zip, at - 4)?))
            };
            (crc, sizes.0, sizes.1)
        } else {
            (crc, u64::from(csize), u64::from(size))
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        if crc != crc32fast::hash(&data)
            || size != data.len() as u64
            || csize != (end - start) as u64
        {
            return Err(format!("{name}: CRC or sizes do not match its data"));
        }
        entries.push((name, data));
    }
}

/// Whether `bsdtar` (libarchive) is installed; said on the test's output when not.
fn bsdtar_present() -> bool {
    let present = Command::new("bsdtar")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        println!("bsdtar not on PATH: the check of its streaming read of the archive skipped");
    }
    present
}

/// `bsdtar` with `args`, the archive piped to it (so it reads as a stream, as
/// `curl URL | bsdtar -xf -` does): its standard output.
fn bsdtar(zip: &[u8], args: &[&str]) -> String {
    let mut child = Command::new("bsdtar")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bsdtar");
    let mut stdin = child.stdin.take().expect("stdin");
    let bytes = zip.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
    });
    let out = child.wait_with_output().expect("bsdtar output");
    writer.join().expect("writer");
    assert!(
        out.status.success(),
        "bsdtar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything under `dir` (symlinks as links, not followed): a regular file as its
/// content and mode, a symlink as its target.
fn extracted(dir: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(dir)
                .expect("beneath")
                .display()
                .to_string();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                out.insert(rel, format!("symlink to {}", target.display()));
            } else {
                let data = std::fs::read(&path).expect("read");
                out.insert(
                    rel,
                    format!(
                        "{} bytes, crc {:08x}, mode {:o}",
                        data.len(),
                        crc32fast::hash(&data),
                        meta.permissions().mode() & 0o7777
                    ),
                );
            }
        }
    }
    out
}

/// Checks the archive `zip` holds exactly `want` (name, content), in every reader:
/// the streaming reader above, `bsdtar` reading a pipe (listing and extracting),
/// Python's `zipfile` (every CRC, the central directory's names) and `unzip -t`.
fn check_archive(zip: &[u8], want: &[(&str, &[u8])], work: &Path) {
    let streamed = stream_entries(zip).unwrap_or_else(|e| panic!("streaming read: {e}"));
    let names: Vec<&str> = streamed.iter().map(|(n, _)| n.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want_names, "what a streaming extractor finds");
    for ((name, data), (_, content)) in streamed.iter().zip(want) {
        assert!(
            data == content,
            "{name}: {} bytes streamed, {} in the file",
            data.len(),
            content.len()
        );
    }

    if bsdtar_present() {
        let listed = bsdtar(zip, &["-tf", "-"]);
        let mut listed: Vec<&str> = listed.lines().collect();
        listed.sort_unstable();
        let mut sorted = want_names.clone();
        sorted.sort_unstable();
        assert_eq!(listed, sorted, "bsdtar -tf - (streaming)");
        let into = work.join("bsdtar-out");
        std::fs::create_dir_all(&into).expect("bsdtar dir");
        bsdtar(zip, &["-xf", "-", "-C", into.to_str().expect("utf-8 path")]);
        let got = extracted(&into);
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(names, sorted, "bsdtar -xf - extracted: {got:?}");
        for (name, content) in want {
            let file = std::fs::read(into.join(name)).expect("extracted file");
            assert!(file == *content, "{name} as bsdtar extracted it");
        }
        std::fs::remove_dir_all(&into).expect("clean");
    }

    let path = work.join("archive.zip");
    std::fs::write(&path, zip).expect("zip");
    let text = storage_common::python(
        "import sys,zipfile,zlib\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\nfor i in z.infolist(): print(i.filename, i.compress_type, i.file_size, '%08x' % zlib.crc32(z.read(i)))",
        &path,
    )
    .unwrap_or_else(|e| panic!("zipfile: {e}"));
    let mut want_lines: Vec<String> = want
        .iter()
        .map(|(n, c)| format!("{n} 8 {} {:08x}", c.len(), crc32fast::hash(c)))
        .collect();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    want_lines.sort_unstable();
    lines.sort_unstable();
    assert_eq!(lines, want_lines, "zipfile: name, method, size, CRC");

    match Command::new("unzip").arg("-tq").arg(&path).output() {
        Ok(out) => assert!(
            out.status.success(),
            "unzip -t: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => println!("unzip not on PATH: its check of the archive skipped"),
    }
}

/// The archives of a folder holding `d/data.bin` (`data`), `d/readme.txt` and
/// `d/tiny.bin` (under 64 bytes: never deflated), each file with a forged
/// descriptor and forged headers: a download of `d` with `archive=true`, and an
/// archive token listing the files, each read by every reader.
fn check_downloads(p: &Proxy, data: &[u8]) {
    let d = p.vfolder_path().join("d");
    std::fs::write(d.join("readme.txt"), b"a normal file\n").expect("readme");
    // Under 64 bytes: a descriptor over nothing, then an entry.
    let tiny = smuggling(b"")[..16].to_vec();
    let tiny = [tiny, forged_header(b"x", b"hi", Some(0o104_755))].concat();
    assert!(tiny.len() < 64, "{}", tiny.len());
    std::fs::write(d.join("tiny.bin"), &tiny).expect("tiny");
    let work = tempfile::tempdir().expect("work");

    let r = p.download("d", "&archive=true", &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    check_archive(
        &r.body,
        &[
            ("data.bin", data),
            ("readme.txt", b"a normal file\n"),
            ("tiny.bin", &tiny),
        ],
        work.path(),
    );

    let token = p.token(
        "/folder/file/archive-download-token",
        serde_json::json!({"volume": "local", "vfid": VFID, "files": ["d/data.bin", "d/tiny.bin", "d/readme.txt"]}),
    );
    let r = p.download_archive(&token);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    check_archive(
        &r.body,
        &[
            ("d/data.bin", data),
            ("d/tiny.bin", &tiny),
            ("d/readme.txt", b"a normal file\n"),
        ],
        work.path(),
    );
}

/// A file of 64 KiB that does not compress (sent as it is) followed by a data
/// descriptor that matches those bytes and two forged local headers: streamed, the
/// archive holds the real files only, the forged bytes inside `data.bin`. Before,
/// such a file went in as method 0 with a data descriptor, and `bsdtar` reading the
/// download from a pipe extracted a set-user-ID root script and a symlink to
/// `/etc/shadow` that the central directory does not list.
#[test]
fn forged_headers_in_a_file_that_does_not_compress_stay_its_bytes() {
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::create_dir_all(p.vfolder_path().join("d")).expect("d");
    let data = smuggling(&incompressible(64 << 10));
    std::fs::write(p.vfolder_path().join("d/data.bin"), &data).expect("data");
    check_downloads(&p, &data);
}

/// The same forged bytes in a file that is mostly holes (sent as it is whatever it
/// holds, so that its zeros cost no deflating): its bytes, holes included, are one
/// entry in every reader.
#[test]
fn forged_headers_in_a_file_mostly_holes_stay_its_bytes() {
    use std::os::unix::fs::MetadataExt as _;
    let p = Proxy::start("");
    create_folder(&p);
    std::fs::create_dir_all(p.vfolder_path().join("d")).expect("d");
    let path = p.vfolder_path().join("d/data.bin");
    let mut data = smuggling(&[b'A'; 64 << 10]);
    std::fs::write(&path, &data).expect("data");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(8 << 20).expect("holes");
    drop(file);
    let meta = std::fs::metadata(&path).expect("stat");
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "the file system keeps holes: {} blocks",
        meta.blocks()
    );
    data.resize(8 << 20, 0);
    check_downloads(&p, &data);
}

/// Downloads the archive of `d` (holding `name`) with a client that stops reading
/// once `name`'s local header has come (the proxy has opened the file and taken its
/// size then, and waits for the client with the rest of it in hand), calls
/// `change` on the file, checks that the writer had not read the whole file by
/// then, and reads the rest: the archive's body.
fn archive_changed_while_read(
    p: &Proxy,
    name: &str,
    change: impl FnOnce(&std::fs::File),
) -> Vec<u8> {
    use std::io::Read as _;
    let path = p.vfolder_path().join("d").join(name);
    let len = std::fs::metadata(&path).expect("stat").len();
    let token = p.token(
        "/folder/file/download",
        serde_json::json!({"volume": "local", "vfid": VFID, "relpath": "d"}),
    );
    // The entry's header carries its name.
    let (mut s, mut raw) = storage_common::get_until(
        p,
        &format!("/download?token={token}&archive=true"),
        name.as_bytes(),
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    change(&file);
    drop(file);
    // The writer's offset in the file after the change: short of the size it saw,
    // so it had not reached the end before the change (else nothing is tested).
    let pos = storage_common::proxy_offset(p, &path).expect("the proxy reads the file");
    assert!(
        pos < len,
        "the writer read all {len} bytes of {name} before it changed (offset {pos}): more buffering than the test allows for"
    );
    s.read_to_end(&mut raw).expect("the rest of the archive");
    let r = appproxy_test_support::http::parse(&raw, false);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.body
}

/// A file's entry holds at most the size the archive saw when it opened the file.
/// The archive decides between deflate and sending as it is (a file mostly holes
/// is never deflated) from that size and the file's blocks; a user who grew the
/// file after the decision (`truncate -s 3900M` on a dense file whose start
/// compresses) had the proxy deflate gigabytes of zeros, and growing a file past
/// 4 GiB cut every archive of a shared folder holding it. Here the file (64 KiB of
/// text, so deflated, then 8 MiB that do not compress, which keep the writer
/// waiting for the client within the file) grows by 8 MiB of holes once its header
/// has come: its entry is its bytes at open, in every reader. A file that shrinks
/// meanwhile is what the writer read of it, its sizes and CRC those of the bytes
/// it holds (as before). Before, the grown file's entry held the 8 MiB of holes.
#[test]
fn a_file_grown_while_archived_is_archived_at_the_size_seen_at_open() {
    let p = Proxy::start("");
    create_folder(&p);
    let d = p.vfolder_path().join("d");
    std::fs::create_dir_all(&d).expect("d");
    let text: Vec<u8> = b"the archive deflates what starts like this\n"
        .iter()
        .copied()
        .cycle()
        .take(64 << 10)
        .collect();
    let data = [text, incompressible(8 << 20)].concat();
    std::fs::write(d.join("grow.bin"), &data).expect("grow");
    let zip = archive_changed_while_read(&p, "grow.bin", |f| {
        f.set_len(data.len() as u64 + (8 << 20)).expect("grow");
    });
    let work = tempfile::tempdir().expect("work");
    check_archive(&zip, &[("grow.bin", &data)], work.path());

    // Shrunk to 1 MiB: the entry holds what the writer read, a prefix of the file
    // at least 1 MiB long, short of its size at open, and says so.
    std::fs::remove_file(d.join("grow.bin")).expect("rm");
    std::fs::write(d.join("shrink.bin"), &data).expect("shrink");
    let zip = archive_changed_while_read(&p, "shrink.bin", |f| {
        f.set_len(1 << 20).expect("shrink");
    });
    let streamed = stream_entries(&zip).unwrap_or_else(|e| panic!("streaming read: {e}"));
    let [(name, got)] = streamed.as_slice() else {
        panic!(
            "one entry: {:?}",
            streamed.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    };
    assert_eq!(name, "shrink.bin");
    assert!(
        got.len() >= 1 << 20 && got.len() < data.len() && data.starts_with(got),
        "{} bytes, not a prefix of the file between its sizes",
        got.len()
    );
    check_archive(&zip, &[("shrink.bin", got)], work.path());
}
