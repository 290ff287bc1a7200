//! From file bytes to the exact training crop: decode, apply the EXIF
//! orientation, convert to RGB (transparency composited on white), Lanczos
//! resize to the planned size and crop at the planned offset.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageReader, RgbImage};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::geometry::{ImageGeometry, Size};
use super::probe::{probe, ImageFormat, ImageInfo};
use super::source::SliceAccess;

/// Decodes an image with its EXIF orientation applied, as RGB. Images of
/// more than `max_pixels` pixels are refused before anything is allocated.
pub fn decode_oriented(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    let info = probe_bytes(bytes, max_pixels)?;
    let mut image = if info.format == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(decode_jpeg(bytes, info.stored_size)?)
    } else {
        let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
        let mut reader = reader;
        reader.no_limits();
        reader.decode().map_err(|e| format!("cannot decode: {e}"))?
    };
    if let Some(orientation) = Orientation::from_exif(info.orientation) {
        image.apply_orientation(orientation);
    }
    Ok(to_rgb_on_white(image))
}

/// JPEG through zune-jpeg in strict mode, which (unlike the lenient default)
/// rejects a truncated file instead of filling the missing part with grey.
/// A file that ends properly but has a damaged entropy stream is still
/// decoded leniently, as browsers and Pillow do.
fn decode_jpeg(bytes: &[u8], size: [u32; 2]) -> Result<RgbImage, String> {
    let decode = |strict: bool| {
        let options = DecoderOptions::default()
            .set_strict_mode(strict)
            .set_max_width(size[0] as usize + 1)
            .set_max_height(size[1] as usize + 1)
            .jpeg_set_out_colorspace(ColorSpace::RGB);
        JpegDecoder::new_with_options(ZCursor::new(bytes), options).decode()
    };
    let pixels = match decode(true) {
        Ok(pixels) => pixels,
        Err(strict_error) => {
            let tail = &bytes[bytes.len().saturating_sub(32)..];
            if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
                return Err(format!("cannot decode JPEG: {strict_error}"));
            }
            decode(false).map_err(|e| format!("cannot decode JPEG: {e}"))?
        }
    };
    RgbImage::from_raw(size[0], size[1], pixels).ok_or_else(|| "JPEG decoded to an unexpected size".to_string())
}

fn probe_bytes(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, String> {
    probe(&mut SliceAccess(bytes), max_pixels).map_err(|e| e.to_string())?
}

/// RGB with any transparency composited on white (a transparent background
/// would otherwise turn black and teach the model black backgrounds).
pub fn to_rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = RgbImage::new(width, height);
    for (out, pixel) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = pixel[3] as u32;
        for c in 0..3 {
            out[c] = ((pixel[c] as u32 * alpha + 255 * (255 - alpha) + 127) / 255) as u8;
        }
    }
    rgb
}

/// Lanczos-3 resize (the filter Pillow calls LANCZOS).
pub fn resize_lanczos(image: &RgbImage, size: Size, resizer: &mut Resizer) -> RgbImage {
    if image.dimensions() == (size[0], size[1]) {
        return image.clone();
    }
    let mut out = RgbImage::new(size[0], size[1]);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    resizer.resize(image, &mut out, &options).expect("RGB to RGB resize with matching pixel types");
    out
}

/// Resizes to `geometry.resize_size` and crops `geometry.target_size` at
/// `geometry.crop_offset`.
pub fn resize_and_crop(image: &RgbImage, geometry: &ImageGeometry, resizer: &mut Resizer) -> Result<RgbImage, String> {
    if image.dimensions() != (geometry.original_size[0], geometry.original_size[1]) {
        return Err(format!(
            "decoded size {}x{} differs from the planned {}x{} (the file changed since planning?)",
            image.width(),
            image.height(),
            geometry.original_size[0],
            geometry.original_size[1]
        ));
    }
    let resized = resize_lanczos(image, geometry.resize_size, resizer);
    let [top, left] = geometry.crop_offset;
    let [width, height] = geometry.target_size;
    if left + width > resized.width() || top + height > resized.height() {
        return Err(format!("crop {width}x{height} at (top {top}, left {left}) does not fit the resized {}x{}", resized.width(), resized.height()));
    }
    Ok(image::imageops::crop_imm(&resized, left, top, width, height).to_image())
}

/// A loss mask on the latent grid (`[grid_h * grid_w]`, row-major, in
/// [0, 1]), from a mask image given its image's geometry, as SimpleTuner
/// computes it: the mask gets the image's resize and crop (a mask of
/// another size is first scaled to the image's), then its red channel
/// over 255 is averaged over each latent cell (area interpolation). Dark
/// is ignored, light trained; transparent pixels count as white.
pub fn prepare_mask(bytes: &[u8], geometry: &ImageGeometry, grid: [usize; 2], max_pixels: u64, resizer: &mut Resizer) -> Result<Vec<f32>, String> {
    let decoded = decode_oriented(bytes, max_pixels)?;
    let original = geometry.original_size;
    let decoded = if decoded.dimensions() == (original[0], original[1]) { decoded } else { resize_lanczos(&decoded, original, resizer) };
    let cropped = resize_and_crop(&decoded, geometry, resizer)?;
    let (width, height) = (cropped.width() as usize, cropped.height() as usize);
    let [grid_h, grid_w] = grid;
    if grid_h == 0 || grid_w == 0 || !height.is_multiple_of(grid_h) || !width.is_multiple_of(grid_w) {
        return Err(format!("a {width}x{height} mask does not divide into the {grid_w}x{grid_h} latent grid"));
    }
    let (cell_h, cell_w) = (height / grid_h, width / grid_w);
    let mut out = vec![0f32; grid_h * grid_w];
    for (x, y, pixel) in cropped.enumerate_pixels() {
        out[(y as usize / cell_h) * grid_w + x as usize / cell_w] += pixel[0] as f32;
    }
    let scale = 1.0 / (255.0 * (cell_h * cell_w) as f32);
    out.iter_mut().for_each(|v| *v *= scale);
    Ok(out)
}

/// The whole preprocessing of one file.
pub fn prepare(bytes: &[u8], geometry: &ImageGeometry, resizer: &mut Resizer) -> Result<RgbImage, String> {
    // The plan admitted this image at its planned size: a file that now
    // claims more pixels is refused before decoding (resize_and_crop names it).
    let [width, height] = geometry.original_size;
    let image = decode_oriented(bytes, width as u64 * height as u64)?;
    resize_and_crop(&image, geometry, resizer)
}
