//! A streaming zip writer for directory downloads: entries are stored (no
//! compression; models and data sets rarely compress) with data descriptors, so the
//! archive is produced in one pass with constant memory and no seeking. Limits of the
//! classic format apply (entries and offsets below 4 GiB); past them the stream ends
//! with an error rather than writing a corrupt archive.
//!
//! The walk goes by descriptor from the directory being archived: every
//! subdirectory and file is opened with `O_NOFOLLOW` beneath its parent, so a
//! symlink (even one swapped in while the archive streams) is never entered or read.
//! Empty directories are kept as directory entries.

use std::io::Read as _;
use std::os::fd::{AsFd as _, OwnedFd};

use axum::body::Bytes;
use rustix::fs::FileType;
use tokio::sync::mpsc;

use super::fsx;

const LIMIT: u64 = u32::MAX as u64;

/// One entry of the central directory.
struct Entry {
    name: Vec<u8>,
    crc: u32,
    size: u32,
    offset: u32,
    mode: u32,
}

/// Streams a zip of every regular file and empty directory under `root` (symlinks
/// are not followed); with `skip_staging`, the top-level `.upload` is left out.
pub fn stream_dir(
    root: OwnedFd,
    skip_staging: bool,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    appproxy_shared::context::spawn_blocking(move || {
        if let Err(e) = write_archive(root, skip_staging, &tx) {
            tracing::warn!(error = %e, "archive stream failed");
            let _ = tx.blocking_send(Err(e));
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn send(
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    bytes: Vec<u8>,
    offset: &mut u64,
) -> std::io::Result<()> {
    *offset += bytes.len() as u64;
    tx.blocking_send(Ok(Bytes::from(bytes)))
        .map_err(|_| std::io::Error::other("client went away"))
}

fn too_big() -> std::io::Error {
    std::io::Error::other("archive larger than 4 GiB: download files one by one")
}

fn local_header(name: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(30 + name.len());
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes()); // version needed
    h.extend_from_slice(&0x0808u16.to_le_bytes()); // data descriptor + UTF-8 names
    h.extend_from_slice(&0u16.to_le_bytes()); // stored
    h.extend_from_slice(&0u16.to_le_bytes()); // time
    h.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
    h.extend_from_slice(&[0u8; 12]); // crc and sizes: in the descriptor
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(name);
    h
}

fn descriptor(crc: u32, size: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
    d.extend_from_slice(&crc.to_le_bytes());
    d.extend_from_slice(&size.to_le_bytes());
    d.extend_from_slice(&size.to_le_bytes());
    d
}

fn write_archive(
    root: OwnedFd,
    skip_staging: bool,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut stack: Vec<(OwnedFd, Vec<u8>)> = vec![(root, Vec::new())];
    let mut buf = vec![0u8; 64 * 1024];
    while let Some((dir, prefix)) = stack.pop() {
        let children = fsx::entries(dir.as_fd())?;
        if children.is_empty() && !prefix.is_empty() {
            // An empty directory is kept as a directory entry.
            if offset > LIMIT {
                return Err(too_big());
            }
            let header_offset = offset as u32;
            send(tx, local_header(&prefix), &mut offset)?;
            send(tx, descriptor(0, 0), &mut offset)?;
            entries.push(Entry {
                name: prefix.clone(),
                crc: 0,
                size: 0,
                offset: header_offset,
                mode: 0o040_755,
            });
            continue;
        }
        for e in children {
            let mut name = prefix.clone();
            name.extend_from_slice(e.name.to_string_lossy().as_bytes());
            match e.kind() {
                FileType::Directory => {
                    if prefix.is_empty() && skip_staging && e.name == ".upload" {
                        continue;
                    }
                    // Swapped for a symlink since it was listed: not entered.
                    let Ok(sub) = fsx::child_dir(dir.as_fd(), &e.name) else {
                        continue;
                    };
                    name.push(b'/');
                    stack.push((sub, name));
                }
                FileType::RegularFile => {
                    let Ok(mut file) = fsx::child_file(dir.as_fd(), &e.name) else {
                        continue;
                    };
                    let meta = file.metadata()?;
                    if meta.len() > LIMIT || offset > LIMIT {
                        return Err(too_big());
                    }
                    use std::os::unix::fs::PermissionsExt as _;
                    let mode = meta.permissions().mode();
                    let header_offset = offset as u32;
                    send(tx, local_header(&name), &mut offset)?;
                    let mut crc = crc32fast::Hasher::new();
                    let mut size = 0u64;
                    loop {
                        let n = file.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        crc.update(&buf[..n]);
                        size += n as u64;
                        if size > LIMIT {
                            return Err(too_big());
                        }
                        send(tx, buf[..n].to_vec(), &mut offset)?;
                    }
                    let crc = crc.finalize();
                    send(tx, descriptor(crc, size as u32), &mut offset)?;
                    entries.push(Entry {
                        name,
                        crc,
                        size: size as u32,
                        offset: header_offset,
                        mode,
                    });
                }
                _ => {}
            }
        }
    }
    if offset > LIMIT || entries.len() > u16::MAX as usize {
        return Err(too_big());
    }
    let cd_offset = offset as u32;
    let mut cd = Vec::new();
    for e in &entries {
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&(0x0300u16 | 20).to_le_bytes()); // made by: Unix
        cd.extend_from_slice(&20u16.to_le_bytes());
        cd.extend_from_slice(&0x0808u16.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&0x21u16.to_le_bytes());
        cd.extend_from_slice(&e.crc.to_le_bytes());
        cd.extend_from_slice(&e.size.to_le_bytes());
        cd.extend_from_slice(&e.size.to_le_bytes());
        cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&[0u8; 8]); // extra, comment, disk, internal attributes
        let dos_dir = if e.name.ends_with(b"/") { 0x10 } else { 0 };
        cd.extend_from_slice(&((e.mode << 16) | dos_dir).to_le_bytes());
        cd.extend_from_slice(&e.offset.to_le_bytes());
        cd.extend_from_slice(&e.name);
    }
    let cd_size = cd.len() as u32;
    cd.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    cd.extend_from_slice(&[0u8; 4]);
    cd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    cd.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    cd.extend_from_slice(&cd_size.to_le_bytes());
    cd.extend_from_slice(&cd_offset.to_le_bytes());
    cd.extend_from_slice(&0u16.to_le_bytes());
    send(tx, cd, &mut offset)?;
    tracing::info!(files = entries.len(), bytes = offset, "archive streamed");
    Ok(())
}
