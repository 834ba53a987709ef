//! The scene-change gate's measure: how different two pictures look, in grey levels.
//!
//! Many cameras show nothing new for minutes, and asking the model about them costs a
//! cycle of the shared engine each time. Before a cycle asks, the loop shrinks its frames to
//! [`Thumbnail`]s and compares them with the newest frame of the last cycle the model
//! answered; a cycle whose frames all look the same ends without a question (see
//! `Commentator` and [`crate::CommentatorConfig::scene_change_threshold`]).
//!
//! A thumbnail is the picture's grey level (BT.601 luma, 0..=255) averaged over the cells of
//! a 32x18 grid: area averaging, so sensor noise and compression artefacts, which differ
//! from pixel to pixel, mostly cancel out, while anything a person would see (an object
//! moving, appearing, a light going on) moves the average of the cells it covers.
//!
//! The difference of two thumbnails is the mean absolute difference of their cells, taken
//! per region of a 4x3 grid over the picture (8x6 cells, a twelfth of the picture each),
//! and the largest of the twelve. Per region rather than over the whole picture, so that a
//! small change is not diluted by the unchanged rest: an object that covers 5% of the
//! picture changes the whole-picture mean by 5% of its contrast, but a region it sits in by
//! 15% (when it straddles four regions) to 60% (inside one). A uniform change (a light, the
//! camera's exposure) changes every region alike, so it scores its full size either way.
//!
//! The cost is one pass over the pixels of each new frame (the model's frames, already
//! small), well under a millisecond for a 448x252 one, against a second or more of engine
//! time per question.

use kibitz_frames::Rgb;

/// Columns of a thumbnail's grid.
pub const THUMB_COLS: usize = 32;
/// Rows of a thumbnail's grid (32x18 is 16:9, the shape of most video; other shapes are
/// squeezed into it, which changes nothing for the comparison).
pub const THUMB_ROWS: usize = 18;
/// Columns and rows of the regions compared on their own (each 8x6 cells).
const REGION_COLS: usize = 4;
const REGION_ROWS: usize = 3;
const CELLS: usize = THUMB_COLS * THUMB_ROWS;

/// A picture shrunk to 32x18 mean grey levels, for [`Thumbnail::difference`].
#[derive(Clone, PartialEq)]
pub struct Thumbnail {
    /// The size of the picture it was made from; `None` for a picture whose buffer does not
    /// match its size (it then differs from everything, so it is never gated).
    size: Option<(u32, u32)>,
    cells: Box<[f32; CELLS]>,
}

impl std::fmt::Debug for Thumbnail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Thumbnail(of {:?})", self.size)
    }
}

impl Thumbnail {
    /// Area-averages `rgb` down to 32x18 grey levels. A picture smaller than the grid in a
    /// direction repeats its pixels instead.
    pub fn of(rgb: &Rgb) -> Thumbnail {
        let (width, height) = (rgb.width as usize, rgb.height as usize);
        let mut cells = Box::new([0f32; CELLS]);
        if width == 0 || height == 0 || rgb.data.len() != width * height * 3 {
            return Thumbnail { size: None, cells };
        }
        let span = |i: usize, cells: usize, pixels: usize| {
            let start = i * pixels / cells;
            (start, ((i + 1) * pixels / cells).max(start + 1))
        };
        for row in 0..THUMB_ROWS {
            let (y0, y1) = span(row, THUMB_ROWS, height);
            for col in 0..THUMB_COLS {
                let (x0, x1) = span(col, THUMB_COLS, width);
                let mut sum = 0u64;
                for y in y0..y1 {
                    let line = &rgb.data[(y * width + x0) * 3..(y * width + x1) * 3];
                    for px in line.chunks_exact(3) {
                        // BT.601 luma in 1/256ths of a grey level.
                        sum +=
                            77 * u64::from(px[0]) + 150 * u64::from(px[1]) + 29 * u64::from(px[2]);
                    }
                }
                let count = ((y1 - y0) * (x1 - x0)) as f64;
                cells[row * THUMB_COLS + col] = (sum as f64 / 256.0 / count) as f32;
            }
        }
        Thumbnail {
            size: Some((rgb.width, rgb.height)),
            cells,
        }
    }

    /// How different the two pictures look, in grey levels (0 to 255): the largest, over the
    /// twelve regions of a 4x3 grid, of the mean absolute difference of the region's cells.
    /// Pictures of different sizes (the source changed) differ infinitely.
    pub fn difference(&self, other: &Thumbnail) -> f64 {
        match (self.size, other.size) {
            (Some(a), Some(b)) if a == b => {}
            _ => return f64::INFINITY,
        }
        let (w, h) = (THUMB_COLS / REGION_COLS, THUMB_ROWS / REGION_ROWS);
        let mut worst = 0f64;
        for region_row in 0..REGION_ROWS {
            for region_col in 0..REGION_COLS {
                let mut sum = 0f64;
                for row in region_row * h..(region_row + 1) * h {
                    let start = row * THUMB_COLS + region_col * w;
                    let cells = start..start + w;
                    for (a, b) in self.cells[cells.clone()].iter().zip(&other.cells[cells]) {
                        sum += f64::from((a - b).abs());
                    }
                }
                worst = worst.max(sum / (w * h) as f64);
            }
        }
        worst
    }

    /// The mean absolute difference over the whole picture, in grey levels: what the
    /// regions improve on (for measurements; the gate uses [`Thumbnail::difference`]).
    pub fn mean_difference(&self, other: &Thumbnail) -> f64 {
        if self.size.is_none() || self.size != other.size {
            return f64::INFINITY;
        }
        let sum: f64 = self
            .cells
            .iter()
            .zip(other.cells.iter())
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum();
        sum / CELLS as f64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::window::fake::{object, scene, still};

    fn flat(width: u32, height: u32, rgb: [u8; 3]) -> Rgb {
        let data: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
        Rgb::new(width, height, data).unwrap()
    }

    #[test]
    fn a_uniform_change_scores_its_size() {
        let dark = Thumbnail::of(&flat(64, 36, [100, 100, 100]));
        let light = Thumbnail::of(&flat(64, 36, [103, 103, 103]));
        assert_eq!(dark.difference(&dark), 0.0);
        assert!((dark.difference(&light) - 3.0).abs() < 1e-4);
        assert!((light.mean_difference(&dark) - 3.0).abs() < 1e-4);
        // Grey is BT.601 luma: pure red is 77/256 of white.
        let red = Thumbnail::of(&flat(64, 36, [255, 0, 0]));
        let black = Thumbnail::of(&flat(64, 36, [0, 0, 0]));
        assert!((red.difference(&black) - 255.0 * 77.0 / 256.0).abs() < 1e-3);
    }

    #[test]
    fn pictures_smaller_than_the_grid_work() {
        let one = Thumbnail::of(&flat(1, 1, [50, 50, 50]));
        let other = Thumbnail::of(&flat(1, 1, [60, 60, 60]));
        assert!((one.difference(&other) - 10.0).abs() < 1e-4);
        let two = Rgb::new(2, 1, vec![0, 0, 0, 200, 200, 200]).unwrap();
        let left = Rgb::new(2, 1, vec![40, 40, 40, 200, 200, 200]).unwrap();
        // The left pixel fills the left half: the regions there change by all 40.
        let score = Thumbnail::of(&two).difference(&Thumbnail::of(&left));
        assert!((score - 40.0).abs() < 1e-4, "{score}");
    }

    #[test]
    fn another_size_or_a_broken_picture_always_differs() {
        let a = Thumbnail::of(&flat(64, 36, [0, 0, 0]));
        let b = Thumbnail::of(&flat(32, 18, [0, 0, 0]));
        assert_eq!(a.difference(&b), f64::INFINITY);
        let broken = Thumbnail::of(&Rgb {
            width: 4,
            height: 4,
            data: Arc::from(vec![0u8; 5]),
        });
        assert_eq!(broken.difference(&broken), f64::INFINITY);
        assert_eq!(broken.mean_difference(&broken), f64::INFINITY);
    }

    #[test]
    fn camera_noise_scores_little() {
        // Two frames of the same scene, each with its own noise of ±2 levels per channel.
        let score = Thumbnail::of(&still(1)).difference(&Thumbnail::of(&still(2)));
        assert!(score < 0.3, "{score}");
    }

    #[test]
    fn a_small_object_counts_in_its_regions_not_diluted_by_the_picture() {
        let before = Thumbnail::of(&still(1));
        // 5% of the picture, 12 levels brighter, where four regions meet: a quarter of it,
        // 15% of each region's area.
        let after = Thumbnail::of(&scene(2, object(12)));
        let score = after.difference(&before);
        assert!((1.6..2.1).contains(&score), "{score}");
        // Over the whole picture it would be 5% of 12 levels, lost in the gate's margin.
        let mean = after.mean_difference(&before);
        assert!((0.5..0.8).contains(&mean), "{mean}");
        // Inside one region it fills 60% of it.
        let inside = Thumbnail::of(&scene(2, |x, y| {
            i32::from((2..38).contains(&x) && (5..25).contains(&y)) * 12
        }));
        let score = inside.difference(&before);
        assert!((7.0..7.6).contains(&score), "{score}");
    }
}
