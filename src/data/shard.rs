//! Memory-mapped shards: a data set packed into one file of decoded (and optionally resized)
//! RGB pixels and training-id labels, read with memmap2 so a loader thread only copies.
//!
//! Layout (little-endian):
//! ```text
//! header  "ADAMCUS1" | version u32 | classes u32 | count u64 | index_offset u64 | index_len u64
//!         | index_crc u32 | header_crc u32 (crc32 of everything before it)
//! data    per sample: RGB bytes column by column (w*h*3: column 0 top to bottom, then
//!         column 1, ...), label bytes row by row (w*h)
//! index   per sample: id_len u16 | id | width u32 | height u32 | image_offset u64
//!         | label_offset u64 | image_crc u32 | label_crc u32
//! ```
//! Images are stored column by column because a loader's costliest step is resampling a crop
//! horizontally: along a column-major image's rows it is fast_image_resize's vertical pass,
//! about three times cheaper per pixel (`Augmenter::apply_column_major`). Version 1 shards
//! (row by row) are refused with a request to re-pack.
//!
//! Every offset is checked against the file size when opening and every blob's checksum the
//! first time it is read, so a truncated or corrupt shard gives an error, never wrong pixels.

use super::augment::transpose_rgb;
use super::error::{DataError, DataErrorKind};
use memmap2::Mmap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const MAGIC: &[u8; 8] = b"ADAMCUS1";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 4 + 4;

#[derive(Debug, Clone)]
pub struct ShardEntry {
    pub id: String,
    pub width: u32,
    pub height: u32,
    image_offset: u64,
    label_offset: u64,
    image_crc: u32,
    label_crc: u32,
}

/// Writes a shard to a temporary file, then fsyncs and renames it into place.
pub struct ShardWriter {
    path: PathBuf,
    temp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    offset: u64,
    classes: u32,
    entries: Vec<ShardEntry>,
    /// The image being written, column by column.
    columns: Vec<u8>,
}

impl ShardWriter {
    pub fn create(path: &Path, classes: usize) -> std::io::Result<ShardWriter> {
        let temp = path.with_extension("shard.tmp");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&temp)?);
        file.write_all(&[0u8; HEADER_LEN])?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            temp,
            file,
            offset: HEADER_LEN as u64,
            classes: classes as u32,
            entries: Vec::new(),
            columns: Vec::new(),
        })
    }

    /// Adds a sample: `rgb` row by row, as decoded.
    pub fn add(&mut self, id: &str, width: u32, height: u32, rgb: &[u8], label: &[u8]) -> std::io::Result<()> {
        assert_eq!(rgb.len(), (width * height * 3) as usize);
        assert_eq!(label.len(), (width * height) as usize);
        self.columns.resize(rgb.len(), 0);
        transpose_rgb(rgb, &mut self.columns, width, height);
        let image_offset = self.offset;
        self.file.write_all(&self.columns)?;
        let label_offset = image_offset + rgb.len() as u64;
        self.file.write_all(label)?;
        self.offset = label_offset + label.len() as u64;
        self.entries.push(ShardEntry {
            id: id.to_string(),
            width,
            height,
            image_offset,
            label_offset,
            image_crc: crc32fast::hash(&self.columns),
            label_crc: crc32fast::hash(label),
        });
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<PathBuf> {
        let mut index = Vec::new();
        for e in &self.entries {
            index.extend_from_slice(&(e.id.len() as u16).to_le_bytes());
            index.extend_from_slice(e.id.as_bytes());
            for v in [e.width, e.height] {
                index.extend_from_slice(&v.to_le_bytes());
            }
            for v in [e.image_offset, e.label_offset] {
                index.extend_from_slice(&v.to_le_bytes());
            }
            for v in [e.image_crc, e.label_crc] {
                index.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.file.write_all(&index)?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&self.classes.to_le_bytes());
        header.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        header.extend_from_slice(&self.offset.to_le_bytes());
        header.extend_from_slice(&(index.len() as u64).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&header)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.temp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            // Make the rename itself durable.
            if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
                let _ = d.sync_all();
            }
        }
        Ok(self.path)
    }
}

/// A shard opened for reading.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    pub classes: usize,
    pub entries: Vec<ShardEntry>,
    verified: Vec<AtomicBool>,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::new(DataErrorKind::Corrupt, path, format!("corrupt or truncated shard: {}", reason.into()))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl Shard {
    pub fn open(path: &Path) -> Result<Shard, DataError> {
        let file = std::fs::File::open(path)
            .map_err(|e| DataError::new(DataErrorKind::Unreadable, path, format!("cannot open shard: {e}")))?;
        // SAFETY: shards are written once (temp file + rename) and never modified in place.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| DataError::new(DataErrorKind::Unreadable, path, format!("cannot map shard: {e}")))?;
        if map.len() < HEADER_LEN {
            return Err(corrupt(path, format!("{} bytes, shorter than the {HEADER_LEN}-byte header", map.len())));
        }
        let mut h = Cursor { bytes: &map[..HEADER_LEN], at: 0 };
        if h.take(8) != Some(MAGIC.as_slice()) {
            return Err(corrupt(path, "bad magic (not an adamcu shard)"));
        }
        let version = h.u32().unwrap();
        let classes = h.u32().unwrap() as usize;
        let count = h.u64().unwrap();
        let index_offset = h.u64().unwrap();
        let index_len = h.u64().unwrap();
        let index_crc = h.u32().unwrap();
        let header_crc = h.u32().unwrap();
        if crc32fast::hash(&map[..HEADER_LEN - 4]) != header_crc {
            return Err(corrupt(path, "header checksum mismatch"));
        }
        if version == 1 {
            return Err(DataError::new(
                DataErrorKind::Layout,
                path,
                format!(
                    "shard version 1 (images row by row) \
                is no longer read; version {VERSION} stores them column by column: pack the data set again \
                with `adamcu pack`"
                ),
            ));
        }
        if version != VERSION {
            return Err(corrupt(path, format!("version {version}, expected {VERSION}")));
        }
        let index_end =
            index_offset.checked_add(index_len).filter(|&end| end == map.len() as u64).ok_or_else(|| {
                corrupt(
                    path,
                    format!(
                        "index ends at {} but the file has {} bytes",
                        index_offset.saturating_add(index_len),
                        map.len()
                    ),
                )
            })?;
        let index = &map[index_offset as usize..index_end as usize];
        if crc32fast::hash(index) != index_crc {
            return Err(corrupt(path, "index checksum mismatch"));
        }
        let mut c = Cursor { bytes: index, at: 0 };
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            let entry = (|| {
                let id_len = c.u16()? as usize;
                let id = String::from_utf8(c.take(id_len)?.to_vec()).ok()?;
                Some(ShardEntry {
                    id,
                    width: c.u32()?,
                    height: c.u32()?,
                    image_offset: c.u64()?,
                    label_offset: c.u64()?,
                    image_crc: c.u32()?,
                    label_crc: c.u32()?,
                })
            })()
            .ok_or_else(|| corrupt(path, format!("index entry {i} is cut short")))?;
            let pixels = entry.width as u64 * entry.height as u64;
            if entry.image_offset + 3 * pixels > index_offset || entry.label_offset + pixels > index_offset {
                return Err(corrupt(path, format!("sample {} points past the data section", entry.id)));
            }
            entries.push(entry);
        }
        let verified = (0..entries.len()).map(|_| AtomicBool::new(false)).collect();
        Ok(Shard { path: path.to_path_buf(), map, classes, entries, verified })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// RGB bytes (column by column) and label ids (row by row) of sample `i`, checksummed the
    /// first time they are read.
    pub fn sample(&self, i: usize) -> Result<(&[u8], &[u8]), DataError> {
        let e = &self.entries[i];
        let pixels = e.width as usize * e.height as usize;
        let rgb = &self.map[e.image_offset as usize..e.image_offset as usize + 3 * pixels];
        let label = &self.map[e.label_offset as usize..e.label_offset as usize + pixels];
        if !self.verified[i].load(Ordering::Relaxed) {
            if crc32fast::hash(rgb) != e.image_crc || crc32fast::hash(label) != e.label_crc {
                return Err(corrupt(&self.path, format!("checksum mismatch in sample {}", e.id)));
            }
            self.verified[i].store(true, Ordering::Relaxed);
        }
        Ok((rgb, label))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
