//! The demo's pictures, drawn with plotters (text in the system's sans-serif font, found
//! through fontconfig): line charts (val mIoU and loss over steps, labelled pixels over steps,
//! mIoU against the labelled fraction as the paper's Fig. 1(c)) and the paper's Fig. 4 (a grid
//! of target val images, their ground truth and each row's prediction in the Cityscapes
//! palette), and where each strategy's labels went (`label_grid`). Every PNG is written
//! atomically.

use crate::data::datasets::Rgb;
use crate::data::labels::palette_colour;
use crate::files::write_png;
use anyhow::{anyhow, Result};
use image::RgbImage;
use plotters::prelude::*;
use std::path::Path;

/// One named line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure: its title, axis names, lines, and an optional horizontal line (a
/// limit, such as the budget).
pub struct Chart<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub series: &'a [Series],
    pub limit: Option<(&'a str, f64)>,
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

fn draw_chart<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let limit = chart.limit.map(|(_, y)| (0.0, y));
    let points = chart.series.iter().flat_map(|s| s.points.iter().copied());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points.chain(limit) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let mut ctx = ChartBuilder::on(area)
        .caption(chart.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1.max(x0 + 1e-9), y0 - pad..y1 + pad)
        .map_err(plot_error)?;
    // Steps: whole numbers; a few percent (the labelled fraction): one decimal, or the ticks
    // between whole numbers read as their neighbours.
    let x_format = |v: &f64| if (x1 - x0).abs() >= 20.0 { format!("{v:.0}") } else { format!("{v:.1}") };
    let y_format = |v: &f64| if (y1 - y0).abs() >= 20.0 { format!("{v:.0}") } else { format!("{v:.2}") };
    ctx.configure_mesh()
        .x_desc(chart.x)
        .y_desc(chart.y)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .draw()
        .map_err(plot_error)?;
    for (i, series) in chart.series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        ctx.draw_series(LineSeries::new(series.points.iter().copied(), colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        if series.points.len() <= 12 {
            ctx.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(plot_error)?;
        }
    }
    if let Some((name, y)) = chart.limit {
        ctx.draw_series(LineSeries::new([(x0, y), (x1, y)], BLACK.stroke_width(1)))
            .map_err(plot_error)?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
    }
    ctx.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// Charts side by side in one PNG, each `width` x `height`.
pub fn charts(path: &Path, charts: &[Chart], width: u32, height: u32) -> Result<()> {
    let (w, h) = (width * charts.len() as u32, height);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let areas = root.split_evenly((1, charts.len()));
        for (area, chart) in areas.iter().zip(charts) {
            draw_chart(area, chart)?;
        }
        root.present().map_err(plot_error)?;
    }
    write_png(path, &RgbImage::from_raw(w, h, buffer).expect("sized buffer"))
}

/// A training-id mask in the Cityscapes palette (ignore: black).
fn coloured(ids: &[u8], width: u32, height: u32, classes: usize) -> RgbImage {
    RgbImage::from_raw(width, height, ids.iter().flat_map(|&id| palette_colour(id, classes)).collect())
        .expect("sized mask")
}

/// The paper's Fig. 4: one line per target val image: the image, its ground truth, then each
/// row's prediction (`predictions[r].1[i]`: row r, image i, training ids at the image's size),
/// under a header naming the columns.
pub fn prediction_grid(
    path: &Path,
    images: &[(Rgb, Vec<u8>)],
    predictions: &[(String, Vec<Vec<u8>>)],
    classes: usize,
) -> Result<()> {
    let Some((first, _)) = images.first() else { return Ok(()) };
    let (cw, ch) = (first.width, first.height);
    let (gap, header) = (4u32, 28u32);
    let columns = 2 + predictions.len() as u32;
    let (w, h) = (columns * cw + (columns - 1) * gap, header + images.len() as u32 * (ch + gap));
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (i, (rgb, truth)) in images.iter().enumerate() {
        let y = header + i as u32 * (ch + gap);
        let mut tiles = vec![
            RgbImage::from_raw(rgb.width, rgb.height, rgb.pixels.clone()).expect("sized image"),
            coloured(truth, rgb.width, rgb.height, classes),
        ];
        tiles.extend(predictions.iter().map(|(_, p)| coloured(&p[i], rgb.width, rgb.height, classes)));
        for (c, tile) in tiles.iter().enumerate() {
            image::imageops::replace(&mut canvas, tile, (c as u32 * (cw + gap)) as i64, y as i64);
        }
    }
    let mut buffer = canvas.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let names = ["image", "ground truth"].into_iter().chain(predictions.iter().map(|(n, _)| n.as_str()));
        for (c, name) in names.enumerate() {
            let style = ("sans-serif", 13).into_font().color(&BLACK);
            root.draw(&Text::new(name.to_string(), ((c as u32 * (cw + gap)) as i32 + 2, 6), style))
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    write_png(path, &RgbImage::from_raw(w, h, buffer).expect("sized buffer"))
}

/// Where a strategy's labels went: each tile an image (dimmed) with its bought pixels in red,
/// shown at twice its size so single pixels stay visible, under a title; each tile's caption
/// gives its count. `tiles`: (image, bought mask in raster order, pixels bought).
pub fn label_grid(path: &Path, title: &str, tiles: &[(RgbImage, Vec<bool>, u64)]) -> Result<()> {
    let Some((first, _, _)) = tiles.first() else { return Ok(()) };
    let (tw, th) = (first.width() * 2, first.height() * 2);
    let (gap, header, caption) = (4u32, 26u32, 18u32);
    let columns = (tiles.len() as u32).min(2);
    let lines = (tiles.len() as u32).div_ceil(columns);
    let (w, h) = (columns * tw + (columns - 1) * gap, header + lines * (th + caption + gap));
    let mut canvas = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut origins = Vec::new();
    for (t, (image, bought, _)) in tiles.iter().enumerate() {
        let mut tile = image.clone();
        for (p, pixel) in tile.pixels_mut().enumerate() {
            *pixel = if bought[p] { image::Rgb([255, 0, 0]) } else { image::Rgb(pixel.0.map(|v| v / 3)) };
        }
        let tile = image::imageops::resize(&tile, tw, th, image::imageops::FilterType::Nearest);
        let (x, y) = ((t as u32 % columns) * (tw + gap), header + (t as u32 / columns) * (th + caption + gap));
        image::imageops::replace(&mut canvas, &tile, x as i64, y as i64);
        origins.push((x, y + th));
    }
    let mut buffer = canvas.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        let style = ("sans-serif", 13).into_font().color(&BLACK);
        root.draw(&Text::new(title.to_string(), (2, 6), style.clone())).map_err(plot_error)?;
        for ((x, y), (image, _, count)) in origins.iter().zip(tiles) {
            let share = 100.0 * *count as f64 / (image.width() * image.height()) as f64;
            let text = format!("{count} pixels ({share:.2} %)");
            root.draw(&Text::new(text, (*x as i32 + 2, *y as i32 + 3), style.clone())).map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
    }
    write_png(path, &RgbImage::from_raw(w, h, buffer).expect("sized buffer"))
}

/// A moving average over `window` values (a noisy per-step loss reads better smoothed).
pub fn smoothed(values: &[f64], window: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= window {
            sum -= values[i - window];
        }
        out.push(sum / (i + 1).min(window) as f64);
    }
    out
}
