//! The built-in generator: the offline reference backend, not a model.
//!
//! It renders a colourful interference pattern whose palette and geometry come from a hash of
//! the prompt, seed, size and image index, so the same request always gives the same PNG bytes
//! and different prompts give visibly different images.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use tollgate_contract::ImageSize;

/// Renders image `index` of a task as PNG bytes. CPU-bound: call it off the async runtime.
pub fn render(prompt: &str, seed: i64, size: ImageSize, index: u8) -> Result<Vec<u8>> {
    let mut hasher = Sha256::new();
    hasher.update(prompt.as_bytes());
    hasher.update(seed.to_le_bytes());
    hasher.update(size.as_str().as_bytes());
    hasher.update([index]);
    let h: [u8; 32] = hasher.finalize().into();
    let unit = |i: usize| f32::from(h[i]) / 255.0;

    let edge = size.pixels();
    let palette: [[f32; 3]; 3] = [
        [unit(0), unit(1), unit(2)],
        [unit(3), unit(4), unit(5)],
        [unit(6), unit(7), unit(8)],
    ];
    let freq = [
        2.0 + 10.0 * unit(9),
        2.0 + 10.0 * unit(10),
        1.0 + 8.0 * unit(11),
        4.0 + 20.0 * unit(12),
    ];
    let tau = std::f32::consts::TAU;
    let phase = [unit(13) * tau, unit(14) * tau, unit(15) * tau];
    let (cx, cy) = (0.2 + 0.6 * unit(16), 0.2 + 0.6 * unit(17));

    let mut pixels = Vec::with_capacity((edge * edge * 3) as usize);
    for y in 0..edge {
        let v = y as f32 / edge as f32;
        for x in 0..edge {
            let u = x as f32 / edge as f32;
            let r = ((u - cx) * (u - cx) + (v - cy) * (v - cy)).sqrt();
            let wave = (freq[0] * u + phase[0]).sin()
                + (freq[1] * v + phase[1]).sin()
                + (freq[2] * (u + v) + phase[2]).sin()
                + (freq[3] * r).sin();
            let t = (wave / 4.0 + 0.5).clamp(0.0, 1.0);
            let (a, b, k) = if t < 0.5 {
                (palette[0], palette[1], t * 2.0)
            } else {
                (palette[1], palette[2], t * 2.0 - 1.0)
            };
            for c in 0..3 {
                pixels.push(((a[c] + (b[c] - a[c]) * k) * 255.0) as u8);
            }
        }
    }

    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, edge, edge);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder
        .write_header()
        .map_err(|e| Error::internal(format!("png header: {e}")))?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| Error::internal(format!("png data: {e}")))?;
    writer
        .finish()
        .map_err(|e| Error::internal(format!("png finish: {e}")))?;
    Ok(png_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_real_png() {
        let a = render("a lighthouse", 42, ImageSize::S256, 0).unwrap();
        let b = render("a lighthouse", 42, ImageSize::S256, 0).unwrap();
        let c = render("a lighthouse", 43, ImageSize::S256, 0).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&a));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (256, 256));
    }
}
