//! Label maps: the ids stored in each data set's label PNGs -> training ids (255 = ignore).
//! Tables from the Cityscapes scripts and RIPU (`../shared/notes/peers.md`).

pub const IGNORE: u8 = 255;

pub const CLASSES_19: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "light",
    "sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

pub const CLASSES_16: [&str; 16] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "light",
    "sign",
    "vegetation",
    "sky",
    "person",
    "rider",
    "car",
    "bus",
    "motorcycle",
    "bicycle",
];

/// In the 16-class setting, the 13-class mIoU drops wall, fence and pole.
pub const DROPPED_FOR_13: [usize; 3] = [3, 4, 5];

/// Cityscapes colour palette for the 19 training classes.
pub const PALETTE_19: [[u8; 3]; 19] = [
    [128, 64, 128],
    [244, 35, 232],
    [70, 70, 70],
    [102, 102, 156],
    [190, 153, 153],
    [153, 153, 153],
    [250, 170, 30],
    [220, 220, 0],
    [107, 142, 35],
    [152, 251, 152],
    [70, 130, 180],
    [220, 20, 60],
    [255, 0, 0],
    [0, 0, 142],
    [0, 0, 70],
    [0, 60, 100],
    [0, 80, 100],
    [0, 0, 230],
    [119, 11, 32],
];

/// Cityscapes label ids of the 19 training classes, in training-id order.
pub const CITYSCAPES_IDS_19: [u16; 19] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33];
/// Cityscapes label ids of the 16 SYNTHIA-setting classes, in training-id order.
pub const CITYSCAPES_IDS_16: [u16; 16] = [7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33];
/// SYNTHIA-RAND-CITYSCAPES class ids of the 16 classes, in training-id order
/// (road 3, sidewalk 4, building 2, wall 21, fence 5, pole 7, light 15, sign 9, vegetation 6,
/// sky 1, person 10, rider 17, car 8, bus 19, motorcycle 12, bicycle 11).
pub const SYNTHIA_IDS_16: [u16; 16] = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11];

/// Largest id each encoding defines; a stored value above it is an error, not "ignore".
const CITYSCAPES_MAX_ID: u16 = 33;
const SYNTHIA_MAX_ID: u16 = 22;

/// How the values in a data set's label PNGs are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelEncoding {
    /// Cityscapes label ids (GTA5, Synscapes, Cityscapes `*_labelIds.png`), 8-bit.
    CityscapesIds,
    /// SYNTHIA-RAND-CITYSCAPES class ids in the first channel of a 16-bit PNG.
    SynthiaIds,
}

/// A lookup table from stored label ids to training ids for one encoding and class count.
#[derive(Debug, Clone)]
pub struct LabelMap {
    table: Vec<u8>,
    pub encoding: LabelEncoding,
    pub classes: usize,
}

impl LabelMap {
    pub fn new(encoding: LabelEncoding, classes: usize) -> Result<LabelMap, String> {
        let (ids, max_id): (&[u16], u16) = match (encoding, classes) {
            (LabelEncoding::CityscapesIds, 19) => (&CITYSCAPES_IDS_19, CITYSCAPES_MAX_ID),
            (LabelEncoding::CityscapesIds, 16) => (&CITYSCAPES_IDS_16, CITYSCAPES_MAX_ID),
            (LabelEncoding::SynthiaIds, 16) => (&SYNTHIA_IDS_16, SYNTHIA_MAX_ID),
            (LabelEncoding::SynthiaIds, n) => {
                return Err(format!("SYNTHIA labels support the 16-class setting, not {n} classes"))
            }
            (_, n) => return Err(format!("no label map for {n} classes (expected 19 or 16)")),
        };
        let mut table = vec![IGNORE; max_id as usize + 1];
        for (train_id, &id) in ids.iter().enumerate() {
            table[id as usize] = train_id as u8;
        }
        Ok(LabelMap { table, encoding, classes })
    }

    /// Training id of a stored id, or `Err(id)` when the id is outside this encoding.
    #[inline]
    pub fn train_id(&self, stored: u16) -> Result<u8, u16> {
        self.table.get(stored as usize).copied().ok_or(stored)
    }

    /// Appends the training ids of a row of 8-bit stored ids, or `Err(id)` for the first id
    /// outside this encoding. One range check per row keeps the per-pixel work to a single
    /// lookup (label decoding is on the PNG loader's hot path).
    pub fn extend_train_ids(&self, stored: &[u8], out: &mut Vec<u8>) -> Result<(), u16> {
        let largest = stored.iter().copied().max().unwrap_or(0);
        if largest as usize >= self.table.len() {
            let bad = stored.iter().find(|&&v| v as usize >= self.table.len()).expect("the maximum is one");
            return Err(*bad as u16);
        }
        out.extend(stored.iter().map(|&v| self.table[v as usize]));
        Ok(())
    }

    pub fn class_names(classes: usize) -> &'static [&'static str] {
        if classes == 16 {
            &CLASSES_16
        } else {
            &CLASSES_19
        }
    }
}

/// The Cityscapes palette colour of a training id (16-class ids are mapped through their
/// Cityscapes id so each class keeps its usual colour); black for ignore.
pub fn palette_colour(train_id: u8, classes: usize) -> [u8; 3] {
    let ids: &[u16] = if classes == 16 { &CITYSCAPES_IDS_16 } else { &CITYSCAPES_IDS_19 };
    ids.get(train_id as usize)
        .and_then(|id| CITYSCAPES_IDS_19.iter().position(|x| x == id))
        .map(|i| PALETTE_19[i])
        .unwrap_or([0, 0, 0])
}
