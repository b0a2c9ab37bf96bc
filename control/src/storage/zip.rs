//! A streaming zip writer for directory downloads: entries are stored (no
//! compression; models and data sets rarely compress) with data descriptors, so the
//! archive is produced in one pass with constant memory and no seeking. Limits of the
//! classic format apply (entries and offsets below 4 GiB); past them the stream ends
//! with an error rather than writing a corrupt archive.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

const LIMIT: u64 = u32::MAX as u64;

/// One entry of the central directory.
struct Entry {
    name: Vec<u8>,
    crc: u32,
    size: u32,
    offset: u32,
    mode: u32,
}

/// Streams a zip of every regular file under `root` (symlinks are not followed).
pub fn stream_dir(root: PathBuf) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    appproxy_shared::context::spawn(async move {
        if let Err(e) = write_archive(&root, &tx).await {
            tracing::warn!(error = %e, "archive stream failed");
            let _ = tx.send(Err(e)).await;
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

async fn send(
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    bytes: Vec<u8>,
    offset: &mut u64,
) -> std::io::Result<()> {
    *offset += bytes.len() as u64;
    tx.send(Ok(Bytes::from(bytes)))
        .await
        .map_err(|_| std::io::Error::other("client went away"))
}

fn too_big() -> std::io::Error {
    std::io::Error::other("archive larger than 4 GiB: download files one by one")
}

async fn write_archive(
    root: &Path,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut stack = vec![root.to_path_buf()];
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(dir) = stack.pop() {
        let mut rd = tokio::fs::read_dir(&dir).await?;
        let mut children = Vec::new();
        while let Some(e) = rd.next_entry().await? {
            children.push(e);
        }
        children.sort_by_key(|e| e.file_name());
        for e in children {
            let ty = e.file_type().await?;
            let path = e.path();
            if ty.is_dir() {
                if dir == root && e.file_name() == ".upload" {
                    continue;
                }
                stack.push(path);
                continue;
            }
            if !ty.is_file() {
                continue;
            }
            let rel = path.strip_prefix(root).map_err(std::io::Error::other)?;
            let name = rel.to_string_lossy().into_owned().into_bytes();
            let meta = e.metadata().await?;
            if meta.len() > LIMIT || offset > LIMIT {
                return Err(too_big());
            }
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode();
            let header_offset = offset as u32;
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
            h.extend_from_slice(&name);
            send(tx, h, &mut offset).await?;
            let mut file = tokio::fs::File::open(&path).await?;
            let mut crc = crc32fast::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                crc.update(&buf[..n]);
                size += n as u64;
                if size > LIMIT {
                    return Err(too_big());
                }
                send(tx, buf[..n].to_vec(), &mut offset).await?;
            }
            let crc = crc.finalize();
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&0x0807_4b50u32.to_le_bytes());
            d.extend_from_slice(&crc.to_le_bytes());
            d.extend_from_slice(&(size as u32).to_le_bytes());
            d.extend_from_slice(&(size as u32).to_le_bytes());
            send(tx, d, &mut offset).await?;
            entries.push(Entry {
                name,
                crc,
                size: size as u32,
                offset: header_offset,
                mode,
            });
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
        cd.extend_from_slice(&(e.mode << 16).to_le_bytes());
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
    send(tx, cd, &mut offset).await?;
    tracing::info!(files = entries.len(), bytes = offset, "archive streamed");
    Ok(())
}
