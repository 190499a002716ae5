//! Readers for the real layouts, label maps, bad input, shards and the synthetic benchmark.

mod common;

use adamcu::config::{AugmentConfig, DatasetConfig, DatasetKind, OnBadSample, SynthConfig};
use adamcu::data::augment::{Augmenter, Geometry};
use adamcu::data::datasets::list;
use adamcu::data::error::DataErrorKind;
use adamcu::data::labels::{LabelEncoding, LabelMap, IGNORE};
use adamcu::data::loader::{Loader, LoaderOptions};
use adamcu::data::shard::Shard;
use adamcu::data::source::SampleSource;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn set(kind: DatasetKind, root: &Path) -> DatasetConfig {
    DatasetConfig::at(kind, root)
}

/// Five 40x20 frames in the GTA5 layout under `dir`, opened as a sample source.
fn five_gta5_frames(dir: &Path) -> Arc<SampleSource> {
    let root = dir.join("gta5");
    gta5(&root, 5, 40, 20);
    Arc::new(SampleSource::open(&set(DatasetKind::Gta5, &root), 19).unwrap())
}

/// A loader of batches of 3 from `source` that stops at a bad sample.
fn batches_of_three(source: &Arc<SampleSource>, augment: &AugmentConfig, workers: usize, seed: u64) -> Loader {
    loader_of(source, augment, 3, workers, seed, 0, adamcu::data::loader::RankShare::WHOLE)
}

/// A loader of `batch_size` samples a batch from `source`, two batches deep, that stops at a
/// bad sample, starting after `start_at` draws of the job, drawing this rank's `share`.
fn loader_of(
    source: &Arc<SampleSource>,
    augment: &AugmentConfig,
    batch_size: usize,
    workers: usize,
    seed: u64,
    start_at: u64,
    share: adamcu::data::loader::RankShare,
) -> Loader {
    let options = LoaderOptions {
        domain: "source",
        batch_size,
        workers,
        capacity: 2,
        seed,
        on_bad_sample: OnBadSample::Stop,
        start_at,
        pinned: false,
        share,
    };
    Loader::spawn(source.clone(), augment, options)
}

#[test]
fn label_maps_match_the_published_tables() {
    // peers.md: GTA5 / Cityscapes label ids -> 19 train ids.
    let published_19 = [
        (7, 0),
        (8, 1),
        (11, 2),
        (12, 3),
        (13, 4),
        (17, 5),
        (19, 6),
        (20, 7),
        (21, 8),
        (22, 9),
        (23, 10),
        (24, 11),
        (25, 12),
        (26, 13),
        (27, 14),
        (28, 15),
        (31, 16),
        (32, 17),
        (33, 18),
    ];
    let map = LabelMap::new(LabelEncoding::CityscapesIds, 19).unwrap();
    for id in 0..=33u16 {
        let expected = published_19.iter().find(|(k, _)| *k == id).map_or(IGNORE, |(_, v)| *v);
        assert_eq!(map.train_id(id), Ok(expected), "cityscapes id {id}");
    }
    assert_eq!(map.train_id(34), Err(34), "ids past 33 are outside the map");

    let published_synthia = [
        (3, 0),
        (4, 1),
        (2, 2),
        (21, 3),
        (5, 4),
        (7, 5),
        (15, 6),
        (9, 7),
        (6, 8),
        (1, 9),
        (10, 10),
        (17, 11),
        (8, 12),
        (19, 13),
        (12, 14),
        (11, 15),
    ];
    let map = LabelMap::new(LabelEncoding::SynthiaIds, 16).unwrap();
    for id in 0..=22u16 {
        let expected = published_synthia.iter().find(|(k, _)| *k == id).map_or(IGNORE, |(_, v)| *v);
        assert_eq!(map.train_id(id), Ok(expected), "synthia id {id}");
    }
    let cityscapes_16 = [7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33];
    let map = LabelMap::new(LabelEncoding::CityscapesIds, 16).unwrap();
    for (train, id) in cityscapes_16.iter().enumerate() {
        assert_eq!(map.train_id(*id), Ok(train as u8));
    }
    assert_eq!(map.train_id(22), Ok(IGNORE), "terrain is not in the 16-class setting");
    assert!(LabelMap::new(LabelEncoding::SynthiaIds, 19).is_err());
}

#[test]
fn each_reader_lists_and_decodes_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    gta5(&root.join("gta5"), 3, 16, 8);
    cityscapes(&root.join("cityscapes"), "val", 2, 16, 8);
    for i in 1..=2 {
        let name = format!("{i:07}.png");
        write_rgb(&root.join("synthia/RGB").join(&name), 16, 8, |_, _| [1, 2, 3]);
        // SYNTHIA id 8 = car -> 16-class train id 12; id 3 = road -> 0.
        write_label16_synthia(&root.join("synthia/GT/LABELS").join(&name), 16, 8, |x, _| if x < 8 { 8 } else { 3 });
        write_rgb(&root.join("synscapes/img/rgb").join(format!("{i}.png")), 16, 8, |_, _| [1, 2, 3]);
        write_label8(&root.join("synscapes/img/class").join(format!("{i}.png")), 16, 8, stripes);
    }

    let gta = SampleSource::open(&set(DatasetKind::Gta5, &root.join("gta5")), 19).unwrap();
    assert_eq!(gta.len(), 3);
    assert_eq!(gta.id(0), "00001");
    let (image, label) = gta.load_full(0).unwrap();
    assert_eq!((image.width, image.height), (16, 8));
    // stripes: road(7)->0, car(26)->13, sky(23)->10, unlabeled(0)->255
    assert_eq!(&label.ids[0..16], &[0, 0, 0, 0, 13, 13, 13, 13, 10, 10, 10, 10, 255, 255, 255, 255]);
    assert_eq!(&image.pixels[12..15], &colour_of(26));

    let city = SampleSource::open(
        &DatasetConfig {
            split: Some(adamcu::config::Split::Val),
            ..set(DatasetKind::Cityscapes, &root.join("cityscapes"))
        },
        19,
    )
    .unwrap();
    assert_eq!(city.len(), 2);
    assert_eq!(city.id(1), "aachen_000000_000002");

    let synthia = SampleSource::open(&set(DatasetKind::Synthia, &root.join("synthia")), 16).unwrap();
    let (_, label) = synthia.load_full(0).unwrap();
    assert_eq!(label.ids[0], 12, "16-bit SYNTHIA car -> train id 12");
    assert_eq!(label.ids[15], 0, "16-bit SYNTHIA road -> train id 0");

    let synscapes = SampleSource::open(&set(DatasetKind::Synscapes, &root.join("synscapes")), 19).unwrap();
    assert_eq!(synscapes.len(), 2);
    assert_eq!(synscapes.load_full(1).unwrap().1.ids[4], 13);
}

#[test]
fn translated_images_pair_with_labels_by_name_and_missing_frames_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("gta5");
    gta5(&original, 4, 16, 8);
    // The original's 00005 has no label; it was translated all the same.
    write_rgb(&original.join("images/00005.png"), 16, 8, |_, _| [1, 2, 3]);
    let translated = dir.path().join("translated");
    // Frame 00002 was never translated; 00009 has no label.
    for i in [1, 3, 4, 5, 9] {
        write_rgb(&translated.join(format!("{i:05}.png")), 16, 8, |_, _| [9, 9, 9]);
    }
    let listing = list(&DatasetConfig {
        labels_kind: Some(DatasetKind::Gta5),
        labels_root: Some(original.clone()),
        ..DatasetConfig::at(DatasetKind::Translated, translated.clone())
    })
    .unwrap();
    let ids: Vec<_> = listing.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["00001", "00003", "00004"]);
    for s in &listing.samples {
        assert_eq!(s.label.file_name(), s.image.file_name(), "paired by name, never by index");
        assert!(s.image.starts_with(&translated) && s.label.starts_with(&original));
    }
    let skipped: Vec<_> =
        listing.skipped.iter().map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(skipped.contains(&"00009.png".to_string()) && skipped.contains(&"00002.png".to_string()), "{skipped:?}");
    assert!(listing.skipped.iter().all(|e| e.kind == DataErrorKind::MissingCounterpart));
    // Each frame once: 00005 is skipped by the original set and by the pairing, reported once.
    assert_eq!(skipped.iter().filter(|n| *n == "00005.png").count(), 1, "{skipped:?}");
    assert_eq!(skipped.len(), 3, "{skipped:?}");
}

#[test]
fn bad_input_gets_an_error_that_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gta5");
    gta5(&root, 6, 16, 8);
    let image = |i: usize| root.join("images").join(format!("{i:05}.png"));
    let label = |i: usize| root.join("labels").join(format!("{i:05}.png"));
    std::fs::write(image(1), b"definitely not a png").unwrap(); // corrupt
    let bytes = std::fs::read(image(2)).unwrap();
    std::fs::write(image(2), &bytes[..bytes.len() / 2]).unwrap(); // truncated
    write_label8(&label(3), 8, 8, stripes); // size mismatch
    write_label8(&label(4), 16, 8, |_, _| 200); // id outside the map
    std::fs::remove_file(image(5)).unwrap();
    std::os::unix::fs::symlink("/nonexistent/frame.png", image(5)).unwrap(); // unreadable
    let source = SampleSource::open(&set(DatasetKind::Gta5, &root), 19).unwrap();
    let errors: Vec<_> = (0..5).map(|i| source.load_full(i).unwrap_err()).collect();
    let expect = |i: usize, kind, path: PathBuf, text: &str| {
        assert_eq!(errors[i].kind, kind, "{}", errors[i]);
        assert_eq!(errors[i].path, path, "{}", errors[i]);
        assert!(errors[i].to_string().contains(text), "{:?} lacks {text:?}", errors[i].to_string());
    };
    expect(0, DataErrorKind::Corrupt, image(1), "not a readable PNG image");
    expect(1, DataErrorKind::Corrupt, image(2), "not a readable PNG image");
    expect(2, DataErrorKind::SizeMismatch, label(3), "label is 8x8 but its image");
    expect(3, DataErrorKind::LabelOutOfMap, label(4), "label id 200 is outside");
    expect(4, DataErrorKind::Unreadable, image(5), "cannot read");
    assert!(source.load_full(5).is_ok());

    // An empty folder and a wrong layout.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("images")).unwrap();
    std::fs::create_dir_all(empty.join("labels")).unwrap();
    let e = list(&set(DatasetKind::Gta5, &empty)).unwrap_err();
    assert_eq!(e.kind, DataErrorKind::Empty);
    assert_eq!(e.path, empty);
    let e = list(&set(DatasetKind::Synthia, &root)).unwrap_err();
    assert_eq!(e.kind, DataErrorKind::Layout);
    assert!(e.to_string().contains("RGB") && e.to_string().contains("missing folder"), "{e}");

    // `adamcu datasets check` lists every problem and exits non-zero.
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[data.source]\nkind = \"gta5\"\nroot = {:?}\n", root)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu"))
        .args(["datasets", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.matches("ERROR").count(), 5, "{stdout}");
    assert!(stdout.contains("1 sample(s)") && stdout.contains("NOT usable"), "{stdout}");
}

#[test]
fn the_loader_skips_or_stops_on_a_bad_sample_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gta5");
    gta5(&root, 4, 32, 16);
    std::fs::write(root.join("images/00002.png"), b"broken").unwrap();
    let source = Arc::new(SampleSource::open(&set(DatasetKind::Gta5, &root), 19).unwrap());
    let augment = AugmentConfig { crop: [16, 16], ..AugmentConfig::default() };
    let options = |policy| LoaderOptions {
        domain: "source",
        batch_size: 2,
        workers: 2,
        capacity: 2,
        seed: 1,
        on_bad_sample: policy,
        start_at: 0,
        pinned: false,
        share: adamcu::data::loader::RankShare::WHOLE,
    };

    let loader = Loader::spawn(source.clone(), &augment, options(OnBadSample::Skip));
    for _ in 0..4 {
        let batch = loader.batches.recv().unwrap().expect("bad sample skipped");
        assert!(!batch.ids.contains(&"00002".to_string()));
        assert_eq!(batch.images.size(), [2, 16, 16, 3]);
    }
    loader.stop();

    let loader = Loader::spawn(source, &augment, options(OnBadSample::Stop));
    let error = loop {
        match loader.batches.recv().unwrap() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(error.path.ends_with("images/00002.png"), "{error}");
    loader.stop();
}

#[test]
fn image_and_label_stay_aligned_through_scale_crop_and_flip() {
    let (w, h) = (64u32, 48u32);
    // Label: 8-px blocks of ids; image: a smooth gradient (so bilinear values are predictable).
    let label: Vec<u8> = (0..h).flat_map(|y| (0..w).map(move |x| ((x / 8 + 3 * (y / 8)) % 19) as u8)).collect();
    let rgb: Vec<u8> = (0..h).flat_map(|y| (0..w).flat_map(move |x| [(x * 4) as u8, (y * 5) as u8, 128])).collect();
    let config = AugmentConfig { crop: [24, 32], scale: [0.5, 1.5], flip: true, ..AugmentConfig::default() };
    let mut augmenter = Augmenter::new(&config);
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut flipped_seen = false;
    for _ in 0..40 {
        let geometry: Geometry = augmenter.draw_geometry(w, h, &mut rng);
        flipped_seen |= geometry.flipped;
        let out = augmenter.apply(&rgb, &label, geometry);
        for y in 0..geometry.crop_height {
            for x in 0..geometry.crop_width {
                let (ox, oy) = geometry.to_original(x, y);
                let i = (y * geometry.crop_width + x) as usize;
                assert_eq!(out.label[i], label[(oy * w + ox) as usize], "label at {x},{y} of {geometry:?}");
                // The image value sampled there is within one source pixel of the same spot.
                let red = out.image[3 * i] as f32;
                assert!(
                    (red - (ox * 4) as f32).abs() <= 4.0 * 1.5 + 1.0,
                    "red {red} vs {} at {x},{y} {geometry:?}",
                    ox * 4
                );
                let green = out.image[3 * i + 1] as f32;
                assert!((green - (oy * 5) as f32).abs() <= 5.0 * 1.5 + 1.0, "green {green} at {x},{y}");
            }
        }
    }
    assert!(flipped_seen);
}

#[test]
fn a_flipped_crop_is_the_mirror_of_the_unflipped_one_at_any_width_and_scale() {
    // Widths that are not multiples of the vectorised blocks, and scales from 1/4 (labels
    // gathered one by one) to 2 (runs of repeated label pixels).
    let (w, h) = (203u32, 61u32);
    let mut noise = noise_bytes(7);
    let rgb: Vec<u8> = (0..w * h * 3).map(|_| noise()).collect();
    let label: Vec<u8> = (0..w * h).map(|_| noise() % 19).collect();
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (crop_w, crop_h, scale) in
        [(37u32, 19u32, [0.25f32, 0.3]), (53, 23, [0.9, 1.1]), (100, 40, [1.8, 2.0]), (16, 8, [0.5, 1.5])]
    {
        let config = AugmentConfig { crop: [crop_h, crop_w], scale, flip: false, ..AugmentConfig::default() };
        let mut augmenter = Augmenter::new(&config);
        for _ in 0..5 {
            let geometry = augmenter.draw_geometry(w, h, &mut rng);
            let plain = augmenter.apply(&rgb, &label, geometry);
            let mirrored = augmenter.apply(&rgb, &label, Geometry { flipped: true, ..geometry });
            for y in 0..crop_h as usize {
                for x in 0..crop_w as usize {
                    let (i, j) = (y * crop_w as usize + x, y * crop_w as usize + crop_w as usize - 1 - x);
                    assert_eq!(
                        mirrored.image[3 * i..3 * i + 3],
                        plain.image[3 * j..3 * j + 3],
                        "pixel {x},{y} of {geometry:?}"
                    );
                    assert_eq!(mirrored.label[i], plain.label[j], "label {x},{y} of {geometry:?}");
                    let (ox, oy) = geometry.to_original(x as u32, y as u32);
                    assert_eq!(plain.label[i], label[(oy * w + ox) as usize], "label {x},{y} of {geometry:?}");
                }
            }
        }
    }
}

#[test]
fn an_upscaled_crop_matches_one_fast_image_resize_call_on_its_window() {
    // Upscaled rows go through two crate calls (horizontal pass first, on the source rows the
    // vertical filter reaches); the result must be the crate's own one-call resample of the
    // same window, up to the rounding of the intermediate, including windows at the edges.
    let (w, h) = (203u32, 61u32);
    let mut noise = noise_bytes(11);
    let rgb: Vec<u8> = (0..w * h * 3).map(|_| noise()).collect();
    let label = vec![0u8; (w * h) as usize];
    let (crop_w, crop_h) = (120u32, 50u32);
    for (scale, crop_y) in [(1.3f64, 0u32), (1.3, 29), (2.0, 0), (2.0, 72), (1.7, 33), (1.1, 11)] {
        let (scaled_w, scaled_h) = ((w as f64 * scale) as u32, (h as f64 * scale) as u32);
        let geometry = Geometry {
            original_width: w,
            original_height: h,
            scaled_width: scaled_w,
            scaled_height: scaled_h,
            crop_x: scaled_w - crop_w - 3,
            crop_y: crop_y.min(scaled_h - crop_h),
            crop_width: crop_w,
            crop_height: crop_h,
            flipped: false,
        };
        let window = geometry.window_in_original();
        assert!(window.3 < crop_h as f64, "the rows of {geometry:?} are upscaled");
        let ours = Augmenter::new(&AugmentConfig::default()).apply(&rgb, &label, geometry).image;
        let expected = one_call_crop(&rgb, &geometry);
        assert_eq!(ours.len(), expected.len(), "bytes of the crop of {geometry:?}");
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert!(a.abs_diff(*b) <= 1, "byte {i} of {geometry:?}: {a} vs {b}");
        }
    }
}

#[test]
fn a_column_major_crop_matches_one_fast_image_resize_call_on_its_window() {
    // Shards store images column by column and resample them in three steps (vertical pass on
    // the columns, transpose, vertical pass); the crop must be the crate's one-call resample
    // of the row-major image's window, up to the rounding of the intermediate: downscaled,
    // upscaled and mixed windows, at the edges, mirrored or not.
    let (w, h) = (203u32, 61u32);
    let mut noise = noise_bytes(13);
    let rgb: Vec<u8> = (0..w * h * 3).map(|_| noise()).collect();
    // Column by column, written out here rather than with the crate's transpose.
    let columns: Vec<u8> = (0..w)
        .flat_map(|x| (0..h).map(move |y| (x, y)))
        .flat_map(|(x, y)| rgb[3 * (y * w + x) as usize..3 * (y * w + x) as usize + 3].to_vec())
        .collect();
    let label = vec![0u8; (w * h) as usize];
    let mut augmenter = Augmenter::new(&AugmentConfig::default());
    for ((crop_w, crop_h), (scale_x, scale_y), (crop_x, crop_y), flipped) in [
        ((120u32, 50u32), (0.62f64, 0.83f64), (0u32, 0u32), false),
        ((120, 50), (0.62, 0.83), (6, 0), true),
        ((120, 50), (1.3, 1.3), (0, 29), false),
        ((120, 50), (2.0, 2.0), (286, 72), true),
        ((120, 50), (1.7, 0.9), (33, 4), false),
        ((120, 50), (0.8, 1.5), (41, 41), true),
        ((40, 20), (0.3, 0.5), (7, 5), false),
        ((40, 20), (0.4, 0.45), (21, 7), true),
        ((40, 12), (0.25, 0.25), (21, 1), false),
    ] {
        let (scaled_w, scaled_h) = (crop_w.max((w as f64 * scale_x) as u32), crop_h.max((h as f64 * scale_y) as u32));
        let geometry = Geometry {
            original_width: w,
            original_height: h,
            scaled_width: scaled_w,
            scaled_height: scaled_h,
            crop_x: crop_x.min(scaled_w - crop_w),
            crop_y: crop_y.min(scaled_h - crop_h),
            crop_width: crop_w,
            crop_height: crop_h,
            flipped,
        };
        let ours = augmenter.apply_column_major(&columns, &label, geometry).image;
        let expected = one_call_crop(&rgb, &geometry);
        assert_eq!(ours.len(), expected.len(), "bytes of the crop of {geometry:?}");
        for (i, pixel) in ours.chunks_exact(3).enumerate() {
            let (x, y) = (i % crop_w as usize, i / crop_w as usize);
            let source_x = if flipped { crop_w as usize - 1 - x } else { x };
            let j = 3 * (y * crop_w as usize + source_x);
            for (c, (a, b)) in pixel.iter().zip(&expected[j..j + 3]).enumerate() {
                assert!(a.abs_diff(*b) <= 1, "pixel {x},{y} channel {c} of {geometry:?}: {a} vs {b}");
            }
        }
    }
}

/// The oracle of the crop tests: fast_image_resize's own one-call bilinear resample of the
/// crop window of a row-major RGB image, unmirrored.
fn one_call_crop(rgb: &[u8], g: &Geometry) -> Vec<u8> {
    use fast_image_resize::{
        images::{Image, ImageRef},
        FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
    };
    let (left, top, width, height) = g.window_in_original();
    let mut crop = Image::new(g.crop_width, g.crop_height, PixelType::U8x3);
    let options =
        ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)).crop(left, top, width, height);
    let image = ImageRef::new(g.original_width, g.original_height, rgb, PixelType::U8x3).unwrap();
    Resizer::new().resize(&image, &mut crop, &options).unwrap();
    crop.into_vec()
}

/// A seeded stream of bytes with no structure (an LCG's high byte), so that a pixel taken
/// from the wrong row or column shows.
fn noise_bytes(seed: u32) -> impl FnMut() -> u8 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 24) as u8
    }
}

#[test]
fn each_batch_holds_its_samples_augmented_by_their_geometries_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_gta5_frames(dir.path());
    let augment = AugmentConfig { crop: [12, 16], scale: [0.8, 1.4], flip: true, ..AugmentConfig::default() };
    let loader = batches_of_three(&source, &augment, 2, 4);
    let mut augmenter = Augmenter::new(&augment);
    for _ in 0..3 {
        let batch = loader.batches.recv().unwrap().unwrap();
        assert_eq!((batch.images.size(), batch.labels.size()), (vec![3, 12, 16, 3], vec![3, 12, 16]));
        for (k, (&index, geometry)) in batch.sample_indices.iter().zip(&batch.geometries).enumerate() {
            let (rgb, label) = source.load_full(index).unwrap();
            let expected = augmenter.apply(&rgb.pixels, &label.ids, *geometry);
            let k = k as i64;
            assert!(Vec::<u8>::try_from(batch.images.get(k).flatten(0, -1)).unwrap() == expected.image, "image {k}");
            assert!(Vec::<u8>::try_from(batch.labels.get(k).flatten(0, -1)).unwrap() == expected.label, "labels {k}");
            assert_eq!(batch.ids[k as usize], source.id(index));
        }
    }
    loader.stop();
}

#[test]
fn the_loader_is_deterministic_for_a_seed_whatever_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_gta5_frames(dir.path());
    let augment = AugmentConfig { crop: [16, 16], ..AugmentConfig::default() };
    let run = |workers, seed| {
        let loader = batches_of_three(&source, &augment, workers, seed);
        let batches: Vec<_> = (0..4).map(|_| loader.batches.recv().unwrap().unwrap()).collect();
        loader.stop();
        batches
    };
    let (a, b, c) = (run(1, 9), run(3, 9), run(1, 10));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ids, y.ids);
        assert_eq!(x.geometries, y.geometries);
        assert!(x.images.equal(&y.images) && x.labels.equal(&y.labels));
    }
    assert!(a.iter().zip(&c).any(|(x, z)| x.ids != z.ids || x.geometries != z.geometries));
    // Each epoch visits every sample once.
    let mut first_epoch: Vec<_> = a.iter().flat_map(|b| b.ids.clone()).take(5).collect();
    first_epoch.sort();
    assert_eq!(first_epoch, ["00001", "00002", "00003", "00004", "00005"]);
}

#[test]
fn data_parallel_ranks_draw_shares_that_make_up_the_one_process_batches() {
    // Batches of 4 in one process against two ranks of 2 each, resumed after 2 batches (8 draws
    // of the job): rank 0's batch then rank 1's is the one-process batch, augmentation included.
    let dir = tempfile::tempdir().unwrap();
    let source = five_gta5_frames(dir.path());
    let augment = AugmentConfig { crop: [16, 16], ..AugmentConfig::default() };
    let run = |batch_size, share| {
        let loader = loader_of(&source, &augment, batch_size, 2, 3, 8, share);
        let batches: Vec<_> = (0..3).map(|_| loader.batches.recv().unwrap().unwrap()).collect();
        loader.stop();
        batches
    };
    use adamcu::data::loader::RankShare;
    let whole = run(4, RankShare::WHOLE);
    let ranks = [run(2, RankShare { rank: 0, world: 2 }), run(2, RankShare { rank: 1, world: 2 })];
    for (b, one) in whole.iter().enumerate() {
        let (r0, r1) = (&ranks[0][b], &ranks[1][b]);
        assert_eq!([r0.ids.clone(), r1.ids.clone()].concat(), one.ids, "batch {b}");
        assert_eq!([r0.geometries.clone(), r1.geometries.clone()].concat(), one.geometries, "batch {b}");
        assert!(tch::Tensor::cat(&[&r0.images, &r1.images], 0).equal(&one.images), "batch {b}");
        assert!(tch::Tensor::cat(&[&r0.labels, &r1.labels], 0).equal(&one.labels), "batch {b}");
    }
    assert_ne!(ranks[0][0].ids, ranks[1][0].ids);
}

#[test]
fn shards_round_trip_and_detect_corruption_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gta5");
    gta5(&root, 3, 24, 12);
    let files = SampleSource::open(&set(DatasetKind::Gta5, &root), 19).unwrap();
    let path = dir.path().join("gta5.shard");
    assert_eq!(adamcu::data::pack::pack(&files, &path, 19, None).unwrap(), 3);
    let shard = SampleSource::open(&set(DatasetKind::Shard, &path), 19).unwrap();
    for i in 0..3 {
        let (a, b) = (files.load_full(i).unwrap(), shard.load_full(i).unwrap());
        assert_eq!(files.id(i), shard.id(i));
        assert_eq!((a.0.pixels, a.1.ids), (b.0.pixels, b.1.ids));
    }
    // The same draws give the same crops from the files and from the shard (its images are
    // resampled column by column: each path is within 1 of the crate's one-call resample).
    use rand::SeedableRng;
    let augment = AugmentConfig { crop: [8, 16], scale: [0.6, 1.6], flip: true, ..AugmentConfig::default() };
    let mut augmenter = Augmenter::new(&augment);
    let (mut rng_files, mut rng_shard) =
        (rand_chacha::ChaCha8Rng::seed_from_u64(4), rand_chacha::ChaCha8Rng::seed_from_u64(4));
    for i in (0..3).cycle().take(12) {
        let from_files = files.load_augmented(i, &mut augmenter, &mut rng_files).unwrap();
        let from_shard = shard.load_augmented(i, &mut augmenter, &mut rng_shard).unwrap();
        assert_eq!((from_files.geometry, &from_files.label), (from_shard.geometry, &from_shard.label));
        assert_eq!(from_files.image.len(), from_shard.image.len());
        assert!(
            from_files.image.iter().zip(&from_shard.image).all(|(a, b)| a.abs_diff(*b) <= 2),
            "crop of sample {i}, {:?}",
            from_files.geometry
        );
    }
    let resized = dir.path().join("small.shard");
    adamcu::data::pack::pack(&files, &resized, 19, Some((12, 6))).unwrap();
    let (rgb, label) = Shard::open(&resized).unwrap().sample(0).map(|(r, l)| (r.to_vec(), l.to_vec())).unwrap();
    assert_eq!((rgb.len(), label.len()), (12 * 6 * 3, 12 * 6));
    assert_eq!(&label[..6], &[0, 0, 13, 13, 10, 10], "nearest keeps label ids");

    let bytes = std::fs::read(&path).unwrap();
    // A flipped pixel byte: the checksum catches it when the sample is read.
    let mut flipped = bytes.clone();
    flipped[100] ^= 0x55;
    let bad = dir.path().join("flipped.shard");
    std::fs::write(&bad, &flipped).unwrap();
    let shard = Shard::open(&bad).unwrap();
    let e = shard.sample(0).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch in sample 00001") && e.path == bad, "{e}");
    // Truncated: refused when opening.
    for cut in [10, bytes.len() / 2, bytes.len() - 1] {
        let short = dir.path().join(format!("short{cut}.shard"));
        std::fs::write(&short, &bytes[..cut]).unwrap();
        let e = Shard::open(&short).err().expect("truncated shard refused");
        assert!(e.to_string().contains("corrupt or truncated shard"), "{e}");
    }
    // A corrupt header or index.
    for at in [20, bytes.len() - 5] {
        let mut broken = bytes.clone();
        broken[at] ^= 1;
        let p = dir.path().join(format!("broken{at}.shard"));
        std::fs::write(&p, &broken).unwrap();
        assert!(Shard::open(&p).is_err());
    }
    // A version 1 shard (images row by row, valid checksums): refused with the fix.
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&1u32.to_le_bytes());
    let header_crc = crc32fast::hash(&old[..44]);
    old[44..48].copy_from_slice(&header_crc.to_le_bytes());
    let p = dir.path().join("version1.shard");
    std::fs::write(&p, &old).unwrap();
    let e = Shard::open(&p).err().expect("version 1 refused");
    assert!(e.to_string().contains("pack the data set again") && e.path == p, "{e}");
}

fn tree_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push((p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap()))
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_synthetic_benchmark_is_deterministic_and_readable_by_the_real_readers() {
    let dir = tempfile::tempdir().unwrap();
    let config = |root: PathBuf, seed| SynthConfig {
        root,
        width: 64,
        height: 32,
        source_images: 3,
        target_train_images: 2,
        target_val_images: 2,
        seed,
    };
    let a = adamcu::data::synth::generate(&config(dir.path().join("a"), 5)).unwrap();
    adamcu::data::synth::generate(&config(dir.path().join("b"), 5)).unwrap();
    adamcu::data::synth::generate(&config(dir.path().join("c"), 6)).unwrap();
    assert_eq!(tree_bytes(&dir.path().join("a")), tree_bytes(&dir.path().join("b")));
    assert_ne!(tree_bytes(&dir.path().join("a")), tree_bytes(&dir.path().join("c")));

    let source = SampleSource::open(&set(DatasetKind::Gta5, &a.source), 19).unwrap();
    assert_eq!(source.len(), 3);
    let target = SampleSource::open(
        &DatasetConfig { split: Some(adamcu::config::Split::Val), ..set(DatasetKind::Cityscapes, &a.target) },
        19,
    )
    .unwrap();
    assert_eq!(target.len(), 2);
    // Only raw images: the translated source comes from the translation stage (Algorithm 1).
    let mut folders: Vec<String> = std::fs::read_dir(dir.path().join("a"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    assert_eq!(folders, ["source", "target"]);
}

#[test]
fn the_cpu_normaliser_matches_the_tensor_formula_on_large_images() {
    use adamcu::data::normalise::Normaliser;
    let config = AugmentConfig::default();
    // 2 images of 7x13 pixels: 91 per image, so whole vector blocks and a remainder.
    let bytes = tch::Tensor::randint(256, [2, 7, 13, 3], (tch::Kind::Uint8, tch::Device::Cpu));
    let ours = Normaliser::new(&config, tch::Device::Cpu).to_input(&bytes);
    let mean = tch::Tensor::from_slice(&config.mean).view([1, 3, 1, 1]);
    let std = tch::Tensor::from_slice(&config.std).view([1, 3, 1, 1]);
    let expected = (bytes.permute([0, 3, 1, 2]).to_kind(tch::Kind::Float) / 255.0 - mean) / std;
    assert_eq!(ours.size(), [2, 3, 7, 13]);
    let max_error = (ours - expected).abs().max().double_value(&[]);
    assert!(max_error < 1e-5, "max error {max_error}");
}

#[test]
fn the_normaliser_makes_nchw_floats_from_loader_bytes() {
    use adamcu::data::normalise::Normaliser;
    let config = AugmentConfig { mean: [0.5, 0.25, 0.0], std: [0.5, 0.25, 1.0], ..AugmentConfig::default() };
    // One 1x2 image: pixel 0 = (255, 0, 51), pixel 1 = (0, 255, 255).
    let bytes = tch::Tensor::from_slice(&[255u8, 0, 51, 0, 255, 255]).view([1, 1, 2, 3]);
    let input = Normaliser::new(&config, tch::Device::Cpu).to_input(&bytes);
    assert_eq!(input.size(), [1, 3, 1, 2]);
    let v: Vec<f32> = Vec::try_from(input.flatten(0, -1)).unwrap();
    let expected = [1.0, -1.0, -1.0, 3.0, 0.2, 1.0];
    for (a, b) in v.iter().zip(expected) {
        assert!((a - b).abs() < 1e-5, "{v:?}");
    }
}

#[test]
fn a_config_override_and_the_data_set_choice_work_together_in_datasets_check_and_pack() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("gta5");
    gta5(&good, 3, 16, 8);
    // The file points at a folder that does not exist; `--set` points at the real one.
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "[data.source]\nkind = \"gta5\"\nroot = \"/nonexistent\"\n").unwrap();
    let root = format!("data.source.root={:?}", good.display().to_string());
    let adamcu = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_adamcu")).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = config.to_str().unwrap();
    let (code, stdout, stderr) = adamcu(&[
        "datasets",
        "check",
        "--config",
        config,
        "--data-set",
        "source",
        "--set",
        &root,
        "--set",
        "data.classes=16",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("== source: 3 sample(s) ==") && stdout.contains("usable"), "{stdout}");
    // 16 classes (SYNTHIA's set): the histogram has 16 rows and the "(ignored)" one.
    assert_eq!(stdout.lines().filter(|l| l.trim_end().ends_with('%')).count(), 17, "{stdout}");
    let shard = dir.path().join("source.shard");
    let (code, stdout, stderr) =
        adamcu(&["pack", "--config", config, "--data-set", "source", "--set", &root, "--out", shard.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("packed 3 sample(s)"), "{stdout}");
    // A set the config lacks is named; --help lists one --set.
    let (code, _, stderr) = adamcu(&["datasets", "check", "--config", config, "--data-set", "target"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--data-set target: the config has no [data.target]; configured: source"), "{stderr}");
    for command in [&["datasets", "check", "--help"][..], &["pack", "--help"][..]] {
        let (_, help, _) = adamcu(command);
        assert_eq!(help.matches("--set <KEY=VALUE>").count(), 1, "{help}");
        assert!(help.contains("--data-set"), "{help}");
    }
}
