//! Picture sizes for the model, and RGB resizing.
//!
//! MiniCPM-V cuts a picture into 448x448 slices, each worth 64 image tokens, on a 14-pixel
//! patch grid. Handing it a picture already near `max_slices` slices keeps the token count
//! (and the time to first token) predictable, and resizing once here is cheaper than every
//! engine doing it.

use fast_image_resize as fir;

use crate::{Error, Rgb};

/// Side of one model slice, in pixels.
pub const SLICE_SIDE: u32 = 448;
/// Model picture sides are multiples of the vision patch size.
pub const SIZE_MULTIPLE: u32 = 14;

/// The size to hand the model a `width` x `height` picture at: same aspect, both sides
/// multiples of 14 and at least 14, never enlarged (upscaling adds no detail, only tokens).
///
/// One slice (`max_slices` 0 or 1) means both sides fit in 448: llama.cpp's MiniCPM-V
/// preprocessing cuts any picture with a side over 448 into an overview plus at least two
/// slices (3 or more 64-token images), while a picture within 448x448 becomes one 64-token
/// image, which llama.cpp itself scales to about a slice's area, aspect kept. More slices
/// allow an area of about `max_slices` slices, which llama.cpp then cuts up.
pub fn model_size(width: u32, height: u32, max_slices: u32) -> (u32, u32) {
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let m = f64::from(SIZE_MULTIPLE);
    if max_slices <= 1 {
        let scale = (f64::from(SLICE_SIDE) / w.max(h)).min(1.0);
        // Rounding down keeps both sides within the slice.
        let side = |v: f64| ((v * scale / m + 1e-9).floor() as u32).max(1) * SIZE_MULTIPLE;
        return (side(w), side(h));
    }
    let area = f64::from(max_slices) * f64::from(SLICE_SIDE * SLICE_SIDE);
    let scale = (area / (w * h)).sqrt().min(1.0);
    let side = |v: f64| ((v * scale / m).round() as u32).max(1) * SIZE_MULTIPLE;
    (side(w), side(h))
}

/// Reusable RGB -> RGB resizer (SIMD, bilinear: smooth enough on downscale, and cheap).
pub struct Resizer {
    inner: fir::Resizer,
    options: fir::ResizeOptions,
}

impl Default for Resizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Resizer {
    pub fn new() -> Self {
        let options = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
        Self {
            inner: fir::Resizer::new(),
            options,
        }
    }

    /// `src` scaled to exactly `width` x `height` (aspect is the caller's business; see
    /// [`model_size`]). The same size returns a cheap clone.
    pub fn resize(&mut self, src: &Rgb, width: u32, height: u32) -> Result<Rgb, Error> {
        if width == 0 || height == 0 {
            return Err(Error::Resize(format!("cannot resize to {width}x{height}")));
        }
        if (src.width, src.height) == (width, height) {
            return Ok(src.clone());
        }
        let from =
            fir::images::ImageRef::new(src.width, src.height, &src.data, fir::PixelType::U8x3)
                .map_err(|e| Error::Resize(e.to_string()))?;
        let mut to = fir::images::Image::new(width, height, fir::PixelType::U8x3);
        self.inner
            .resize(&from, &mut to, &self.options)
            .map_err(|e| Error::Resize(e.to_string()))?;
        Rgb::new(width, height, to.into_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area_slices(w: u32, h: u32) -> f64 {
        f64::from(w * h) / f64::from(SLICE_SIDE * SLICE_SIDE)
    }

    #[test]
    fn model_size_keeps_aspect_and_area() {
        for (w, h, slices) in [(1280, 720, 4), (1920, 1080, 9), (720, 1280, 2)] {
            let (mw, mh) = model_size(w, h, slices);
            assert_eq!(mw % 14, 0);
            assert_eq!(mh % 14, 0);
            let got = area_slices(mw, mh);
            assert!(
                (got / f64::from(slices) - 1.0).abs() < 0.1,
                "{w}x{h}@{slices}: {mw}x{mh} = {got} slices"
            );
            let aspect = f64::from(w) / f64::from(h);
            let maspect = f64::from(mw) / f64::from(mh);
            // Rounding moves each side by at most half a 14-pixel step.
            let tolerance = 7.0 / f64::from(mw.min(mh)) + 0.01;
            assert!(
                (maspect - aspect).abs() / aspect < tolerance,
                "{w}x{h}: {mw}x{mh}"
            );
        }
    }

    #[test]
    fn model_size_one_slice_fits_inside_448() {
        // 1280x720 scaled by 448/1280 = 0.35: 448 x 252, both multiples of 14.
        assert_eq!(model_size(1280, 720, 1), (448, 252));
        assert_eq!(model_size(720, 1280, 1), (252, 448));
        assert_eq!(model_size(4000, 100, 1), (448, 14));
        assert_eq!(model_size(1920, 1080, 0), (448, 252));
        for (w, h) in [(640, 480), (1000, 999), (449, 449), (3840, 2160)] {
            let (mw, mh) = model_size(w, h, 1);
            assert!(mw <= SLICE_SIDE && mh <= SLICE_SIDE, "{w}x{h} -> {mw}x{mh}");
        }
    }

    #[test]
    fn model_size_never_below_one_patch_and_never_enlarges() {
        assert_eq!(model_size(1, 1, 1), (14, 14));
        assert_eq!(model_size(0, 0, 0), (14, 14));
        assert_eq!(model_size(320, 240, 4), (322, 238));
        let (w, h) = model_size(100_000, 3, 1);
        assert_eq!(h, 14);
        assert_eq!(w % 14, 0);
        // More slices allowed than the picture needs: stays at its own size (rounded).
        assert_eq!(model_size(448, 448, 9), (448, 448));
    }

    #[test]
    fn resize_changes_size_and_keeps_flat_colour() {
        let src = Rgb::new(64, 48, [10u8, 200, 90].repeat(64 * 48)).unwrap();
        let mut r = Resizer::new();
        let out = r.resize(&src, 28, 14).unwrap();
        assert_eq!(
            (out.width, out.height, out.data.len()),
            (28, 14, 28 * 14 * 3)
        );
        assert!(out.data.chunks(3).all(|p| p == [10, 200, 90]));
        let up = r.resize(&src, 140, 98).unwrap();
        assert_eq!((up.width, up.height), (140, 98));
    }

    #[test]
    fn resize_same_size_is_a_clone_and_zero_is_an_error() {
        let src = Rgb::new(4, 4, vec![7u8; 48]).unwrap();
        let mut r = Resizer::new();
        let same = r.resize(&src, 4, 4).unwrap();
        assert!(std::sync::Arc::ptr_eq(&same.data, &src.data));
        assert!(matches!(r.resize(&src, 0, 4), Err(Error::Resize(_))));
    }

    #[test]
    fn rgb_new_checks_length() {
        assert!(Rgb::new(2, 2, vec![0u8; 12]).is_ok());
        assert!(matches!(
            Rgb::new(2, 2, vec![0u8; 11]),
            Err(Error::BadPicture(_))
        ));
        assert!(matches!(
            Rgb::new(0, 2, Vec::<u8>::new()),
            Err(Error::BadPicture(_))
        ));
    }
}
