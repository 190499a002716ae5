//! The ledger of bought target labels: one bitset per target training image at the size the
//! network is trained on it (after `resize`: the pixels it can see, where the budget counts),
//! in a memory-mapped file in the run directory.
//!
//! - Ma (`spent`) is the exact number of set bits; `buy` refuses once Ma = Me, so the budget
//!   can never be passed, and a pixel already bought is never charged again.
//! - Bits are written straight into the mapping: a killed process loses nothing (the kernel
//!   holds the pages); they are made durable against power loss at every checkpoint (before
//!   its snapshot is written) and at the end of a run.
//! - Resuming from a checkpoint replays the steps after it. Pixels bought in those steps
//!   before the crash are *pending* (in the ledger, not in the checkpoint's snapshot): they
//!   stay bought and charged, the replay sees them as not yet bought, and when the replay
//!   buys one again it is not charged twice. A deterministic replay thus ends with the same
//!   ledger as an uninterrupted run.
//!
//! File layout (little-endian): "ADAMCULG" | version u32 | images u32 | budget u64 |
//! header_len u64 | then per image: id_len u16, id, width u32, height u32 | padding to 8 |
//! bitsets, each rounded up to whole u64 words.

use anyhow::{Context, Result};
use memmap2::MmapMut;
use std::path::{Path, PathBuf};

/// Why a ledger cannot be opened: each a refusal a caller may branch on (start a new run
/// directory, restore a backup), never a reason to drop the labels already bought.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "{}: ledger format version {found}, this adamcu reads version {VERSION} (budget counted at the \
         training resolution); finish that run with the adamcu that began it, or start a new run directory",
        path.display()
    )]
    OtherVersion { path: PathBuf, found: u32 },
    #[error(
        "{}: this ledger was made for other target images or another budget (stored budget {stored_budget:?} \
         pixels, configured {budget}); use a new run directory to change the experiment",
        path.display()
    )]
    OtherExperiment { path: PathBuf, stored_budget: Option<u64>, budget: u64 },
    #[error("{}: {spent} pixels bought, more than the budget {budget}: the ledger is corrupt", path.display())]
    OverBudget { path: PathBuf, spent: u64, budget: u64 },
    #[error("{}: snapshot does not belong to the ledger {}", snapshot.display(), path.display())]
    ForeignSnapshot { snapshot: PathBuf, path: PathBuf },
    #[error("{}: the snapshot holds purchases the ledger lacks: ledger corrupt", path.display())]
    SnapshotAhead { path: PathBuf },
}

const MAGIC: &[u8; 8] = b"ADAMCULG";
/// 2: pixels at the training resolution (1 counted stored pixels, of which a resized target
/// showed the network only some).
const VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerImage {
    pub id: String,
    pub width: u32,
    pub height: u32,
}

/// A copy of the ledger's file at one step, the companion of that step's checkpoint.
pub struct LedgerSnapshot {
    ledger_path: PathBuf,
    bytes: Vec<u8>,
}

impl LedgerSnapshot {
    /// Makes the ledger durable, then writes the copy to `path` atomically. The ledger only
    /// gains bits, so once synced it holds every bit of the copy: a power loss can never leave
    /// a snapshot that knows purchases the ledger lost (`open_resumed` refuses that as
    /// corruption). fsync through a second handle writes back the mapping's dirty pages too:
    /// on Linux they live in the same page cache.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::File::open(&self.ledger_path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot flush the ledger", self.ledger_path.display()))?;
        crate::files::write_atomically(path, |temp| Ok(std::fs::write(temp, &self.bytes)?))
    }
}

pub struct Ledger {
    path: PathBuf,
    map: MmapMut,
    images: Vec<LedgerImage>,
    /// Byte offset of each image's bitset.
    offsets: Vec<usize>,
    /// Pixels charged (set bits), pending ones included.
    spent: u64,
    budget: u64,
    total: u64,
    /// Bits bought after the snapshot a resumed run started from (same layout as the map).
    pending: Vec<u8>,
    pending_count: u64,
    bits_start: usize,
}

fn header(images: &[LedgerImage], budget: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(images.len() as u32).to_le_bytes());
    h.extend_from_slice(&budget.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes()); // header_len, patched below
    for image in images {
        h.extend_from_slice(&(image.id.len() as u16).to_le_bytes());
        h.extend_from_slice(image.id.as_bytes());
        h.extend_from_slice(&image.width.to_le_bytes());
        h.extend_from_slice(&image.height.to_le_bytes());
    }
    while h.len() % 8 != 0 {
        h.push(0);
    }
    let len = h.len() as u64;
    h[24..32].copy_from_slice(&len.to_le_bytes());
    h
}

fn bitset_bytes(image: &LedgerImage) -> usize {
    (image.width as usize * image.height as usize).div_ceil(64) * 8
}

impl Ledger {
    /// Opens the run's ledger, or creates an empty one. `budget` is Me in pixels. An existing
    /// ledger must describe the same images and budget: anything else would silently change
    /// the experiment.
    pub fn open_or_create(path: &Path, images: &[LedgerImage], budget: u64) -> Result<Ledger> {
        let header = header(images, budget);
        let size = header.len() + images.iter().map(bitset_bytes).sum::<usize>();
        if !path.exists() {
            // Write the empty ledger whole under a temporary name, then rename it into place.
            crate::files::write_atomically(path, |temp| {
                let file = std::fs::File::create(temp)?;
                file.set_len(size as u64)?;
                std::io::Write::write_all(&mut &file, &header)?;
                Ok(())
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot open the ledger", path.display()))?;
        // SAFETY: the run-directory lock gives this process sole use of the file.
        let map = unsafe { MmapMut::map_mut(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let stored_version = map.get(8..12).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        if map.len() >= 12 && map[..8] == MAGIC[..] && stored_version != Some(VERSION) {
            return Err(LedgerError::OtherVersion { path: path.into(), found: stored_version.unwrap_or(0) }.into());
        }
        if map.len() != size || map[..header.len()] != header[..] {
            let stored_budget = map.get(16..24).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
            return Err(LedgerError::OtherExperiment { path: path.into(), stored_budget, budget }.into());
        }
        let mut offsets = Vec::with_capacity(images.len());
        let mut at = header.len();
        for image in images {
            offsets.push(at);
            at += bitset_bytes(image);
        }
        let spent = map[header.len()..].iter().map(|b| b.count_ones() as u64).sum();
        let total = images.iter().map(|i| i.width as u64 * i.height as u64).sum();
        if spent > budget {
            return Err(LedgerError::OverBudget { path: path.into(), spent, budget }.into());
        }
        Ok(Ledger {
            path: path.to_path_buf(),
            map,
            images: images.to_vec(),
            offsets,
            spent,
            budget,
            total,
            pending: Vec::new(),
            pending_count: 0,
            bits_start: header.len(),
        })
    }

    /// Opens the ledger of a run resumed from a checkpoint whose ledger snapshot is `snapshot`.
    pub fn open_resumed(path: &Path, images: &[LedgerImage], budget: u64, snapshot: &Path) -> Result<Ledger> {
        let mut ledger = Ledger::open_or_create(path, images, budget)?;
        let saved = std::fs::read(snapshot)
            .with_context(|| format!("{}: cannot read the ledger snapshot", snapshot.display()))?;
        if saved.len() != ledger.map.len() || saved[..ledger.bits_start] != ledger.map[..ledger.bits_start] {
            return Err(LedgerError::ForeignSnapshot { snapshot: snapshot.into(), path: path.into() }.into());
        }
        let start = ledger.bits_start;
        let mut pending = vec![0u8; ledger.map.len() - start];
        for (i, p) in pending.iter_mut().enumerate() {
            let (now, then) = (ledger.map[start + i], saved[start + i]);
            if then & !now != 0 {
                return Err(LedgerError::SnapshotAhead { path: path.into() }.into());
            }
            *p = now & !then;
        }
        ledger.pending_count = pending.iter().map(|b| b.count_ones() as u64).sum();
        ledger.pending = pending;
        Ok(ledger)
    }

    /// The ledger as it is now, for a checkpoint: a copy, so that purchases can go on while
    /// it is written.
    pub fn snapshot(&self) -> LedgerSnapshot {
        LedgerSnapshot { ledger_path: self.path.clone(), bytes: self.map[..].to_vec() }
    }

    /// Ma as the run sees it: purchases up to the current step (pending ones excluded).
    pub fn spent(&self) -> u64 {
        self.spent - self.pending_count
    }

    /// Pixels charged to the budget, pending ones included (never above Me).
    pub fn charged(&self) -> u64 {
        self.spent
    }
    /// Me: the budget in pixels.
    pub fn budget(&self) -> u64 {
        self.budget
    }
    /// Mt: all target training pixels.
    pub fn total_pixels(&self) -> u64 {
        self.total
    }
    /// Ma / Mt: the share of the target's training pixels labelled (pending ones included).
    pub fn labelled_fraction(&self) -> f64 {
        self.spent as f64 / self.total as f64
    }
    pub fn remaining(&self) -> u64 {
        self.budget - self.spent()
    }
    pub fn images(&self) -> &[LedgerImage] {
        &self.images
    }

    /// What one counted pixel is, for reports: "pixels at the training resolution (WxH per
    /// image)", or "(per image)" when the sizes differ.
    pub fn pixel_unit(&self) -> String {
        match self.images.first() {
            Some(first) if self.images.iter().all(|i| (i.width, i.height) == (first.width, first.height)) => {
                format!("pixels at the training resolution ({}x{} per image)", first.width, first.height)
            }
            _ => "pixels at the training resolution (per image)".into(),
        }
    }

    fn bit(&self, image: usize, x: u32, y: u32) -> (usize, u8) {
        let i = y as usize * self.images[image].width as usize + x as usize;
        (self.offsets[image] + i / 8, 1u8 << (i % 8))
    }

    fn is_pending(&self, byte: usize, mask: u8) -> bool {
        !self.pending.is_empty() && self.pending[byte - self.bits_start] & mask != 0
    }

    /// Whether the pixel is bought as of the current step (pending purchases are not yet).
    pub fn is_bought(&self, image: usize, x: u32, y: u32) -> bool {
        let (byte, mask) = self.bit(image, x, y);
        self.map[byte] & mask != 0 && !self.is_pending(byte, mask)
    }

    /// `is_bought` for every pixel of one image, as its bitset: bit `y * width + x`, least
    /// significant bit first (the device sampler reads it there).
    pub fn bought_bits(&self, image: usize) -> Vec<u8> {
        let start = self.offsets[image];
        let bits = &self.map[start..start + bitset_bytes(&self.images[image])];
        if self.pending.is_empty() {
            return bits.to_vec();
        }
        let pending = &self.pending[start - self.bits_start..][..bits.len()];
        bits.iter().zip(pending).map(|(b, p)| b & !p).collect()
    }

    /// `bought_bits` as one flag per pixel, in raster order (y * width + x).
    pub fn bought_mask(&self, image: usize) -> Vec<bool> {
        let bits = self.bought_bits(image);
        let g = &self.images[image];
        (0..g.width as usize * g.height as usize).map(|i| bits[i / 8] >> (i % 8) & 1 != 0).collect()
    }

    /// Buys the label of one pixel (training resolution). Returns true when it was newly bought (or
    /// a pending purchase was replayed, which costs nothing more); false when it was already
    /// bought or the budget is spent.
    pub fn buy(&mut self, image: usize, x: u32, y: u32) -> bool {
        let (byte, mask) = self.bit(image, x, y);
        if self.is_pending(byte, mask) {
            self.pending[byte - self.bits_start] &= !mask;
            self.pending_count -= 1;
            return true;
        }
        if self.map[byte] & mask != 0 || self.spent() >= self.budget || self.spent >= self.budget {
            return false;
        }
        self.map[byte] |= mask;
        self.spent += 1;
        true
    }

    /// Pixels bought in one image.
    pub fn bought_in(&self, image: usize) -> u64 {
        let start = self.offsets[image];
        self.map[start..start + bitset_bytes(&self.images[image])].iter().map(|b| b.count_ones() as u64).sum()
    }

    /// Makes every bought bit durable (msync).
    pub fn flush(&self) -> Result<()> {
        self.map.flush().with_context(|| format!("{}: cannot flush the ledger", self.path.display()))
    }
}
