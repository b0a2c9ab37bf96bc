//! Reading the logs line by line: the inputs (files, stdin), a line's bound
//! ([`MAX_LINE_BYTES`]), and reading an input a second time for the second pass of a
//! query (a file re-opened, stdin or a pipe held as read).

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::Context as _;

use crate::{parse_line, Entry};

/// The longest line read, in bytes (its line break not counted, a `\r` before it
/// counted): a longer one is skipped and counted, never held (stdin and pipes are
/// held line by line for the second pass, such a line as an empty one; files are
/// read again).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// One input: a log file, or stdin.
#[derive(Debug)]
pub struct Input {
    /// Its name in `file:line` (the path as given, `stdin`).
    name: String,
    how: How,
}

#[derive(Debug)]
enum How {
    /// A file, and once the first pass read it for a second, the file as opened
    /// then with the bytes read (the second pass reads the same file, rotated or
    /// not, as far: lines written meanwhile are not taken).
    File {
        path: PathBuf,
        read: Option<(File, u64)>,
    },
    /// Stdin, not read yet.
    Stdin,
    /// What stdin (or a file that is a pipe) gave, held for the second pass.
    Held(Vec<u8>),
}

/// What one read of an input found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Found {
    /// Lines that are log entries.
    pub parsed: usize,
    /// Lines longer than [`MAX_LINE_BYTES`], skipped.
    pub too_long: usize,
    /// Lines that hold something but are no log entry (a logfmt line, a panic's
    /// text), passed over.
    pub other: usize,
}

impl Input {
    /// The inputs of a command line: each file, `-` for stdin, and stdin alone when
    /// none is given. (Stdin is read once: a second `-` finds it at its end.)
    pub fn list(files: &[PathBuf]) -> Vec<Input> {
        if files.is_empty() {
            return vec![Input::stdin()];
        }
        files
            .iter()
            .map(|path| {
                if path.as_os_str() == "-" {
                    Input::stdin()
                } else {
                    Input {
                        name: path.display().to_string(),
                        how: How::File {
                            path: path.clone(),
                            read: None,
                        },
                    }
                }
            })
            .collect()
    }

    fn stdin() -> Input {
        Input {
            name: "stdin".to_owned(),
            how: How::Stdin,
        }
    }

    /// Its name in `file:line`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads every line, handing each log entry to `each` with its line number (from
    /// 1; its `source` is left empty). With `again`, this input will be read a second
    /// time: what cannot be re-read (stdin, a file that is a pipe) is held as read,
    /// raw; a file is kept open and read again from its start as far as the first
    /// read went (renamed or removed meanwhile, it is the same file), and one made
    /// shorter meanwhile is an error.
    pub fn read(
        &mut self,
        again: bool,
        each: &mut dyn FnMut(Entry, usize),
    ) -> anyhow::Result<Found> {
        let name = &self.name;
        match &mut self.how {
            How::Held(bytes) => Ok(read_lines(&mut &bytes[..], each, None)
                .with_context(|| format!("reading {name}"))?
                .0),
            How::Stdin => {
                let mut held = again.then(Vec::new);
                let (found, _) = read_lines(&mut std::io::stdin().lock(), each, held.as_mut())
                    .context("reading stdin")?;
                if let Some(held) = held {
                    self.how = How::Held(held);
                }
                Ok(found)
            }
            How::File { path, read } => match read {
                Some((file, len)) => {
                    let len = *len;
                    file.seek(SeekFrom::Start(0))
                        .with_context(|| format!("rewinding {name} for the second pass"))?;
                    let (found, bytes) =
                        read_lines(&mut BufReader::new(file.by_ref().take(len)), each, None)
                            .with_context(|| format!("reading {name} again"))?;
                    anyhow::ensure!(
                        bytes == len,
                        "{name} is shorter on the second pass ({bytes} bytes) than on \
                         the first ({len}): truncated or replaced while read"
                    );
                    Ok(found)
                }
                None => {
                    let file = File::open(&*path).with_context(|| format!("reading {name}"))?;
                    if again && !is_regular(&file) {
                        let mut held = Vec::new();
                        let (found, _) =
                            read_lines(&mut BufReader::new(file), each, Some(&mut held))
                                .with_context(|| format!("reading {name}"))?;
                        self.how = How::Held(held);
                        return Ok(found);
                    }
                    let mut reader = BufReader::new(file);
                    let (found, bytes) = read_lines(&mut reader, each, None)
                        .with_context(|| format!("reading {name}"))?;
                    if again {
                        *read = Some((reader.into_inner(), bytes));
                    }
                    Ok(found)
                }
            },
        }
    }
}

fn is_regular(file: &File) -> bool {
    file.metadata().map(|m| m.is_file()).unwrap_or(false)
}

/// Reads `r` line by line (at `\n`; a `\r` before it dropped, as `str::lines` does),
/// handing each log entry to `each`; returns what it found and the bytes read. With
/// `hold`, each line read is also kept there for a second pass (an over-long one as
/// an empty line, so the line numbers stay).
fn read_lines(
    r: &mut dyn BufRead,
    each: &mut dyn FnMut(Entry, usize),
    mut hold: Option<&mut Vec<u8>>,
) -> std::io::Result<(Found, u64)> {
    let mut found = Found::default();
    let mut bytes = 0u64;
    let mut line = Vec::new();
    let mut number = 0usize;
    while let Some(fits) = next_line(r, &mut line, MAX_LINE_BYTES, &mut bytes)? {
        number += 1;
        if let Some(held) = hold.as_deref_mut() {
            held.extend_from_slice(&line);
            held.push(b'\n');
        }
        if !fits {
            found.too_long += 1;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(e) = parse_line(&text, "") {
            found.parsed += 1;
            each(e, number);
        } else if !text.trim().is_empty() {
            found.other += 1;
        }
    }
    Ok((found, bytes))
}

/// Reads one line into `line` (without its line break): `None` at the end,
/// `Some(false)` for a line longer than `max` (read past, not held: `line` is empty).
fn next_line(
    r: &mut dyn BufRead,
    line: &mut Vec<u8>,
    max: usize,
    bytes: &mut u64,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let mut fits = true;
    let mut any = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any.then_some(fits));
        }
        any = true;
        let (part, used, ends) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        if fits {
            if line.len() + part.len() > max {
                fits = false;
                line.clear();
                line.shrink_to(max);
            } else {
                line.extend_from_slice(part);
            }
        }
        r.consume(used);
        *bytes += used as u64;
        if ends {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(fits));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Option<String>> {
        let mut r = BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut bytes = 0;
        let mut out = Vec::new();
        while let Some(fits) = next_line(&mut r, &mut line, max, &mut bytes).expect("read") {
            out.push(fits.then(|| String::from_utf8_lossy(&line).into_owned()));
        }
        assert_eq!(bytes, input.len() as u64);
        out
    }

    #[test]
    fn lines_as_str_lines_gives_them_and_long_ones_skipped() {
        let text = "a\r\n\nbcdefgh\nij\r\nklmnopqrstu\nlast";
        let want: Vec<Option<String>> = text.lines().map(|l| Some(l.to_owned())).collect();
        assert_eq!(lines(text.as_bytes(), 100), want);
        let short = lines(text.as_bytes(), 7);
        assert_eq!(short[2], Some("bcdefgh".to_owned()));
        assert_eq!(short[4], None);
        assert_eq!(short.len(), want.len());
        assert_eq!(lines(b"0123456789", 3), [None]);
        assert_eq!(lines(b"", 3), Vec::<Option<String>>::new());
        assert_eq!(lines(b"\n", 3), [Some(String::new())]);
    }
}
