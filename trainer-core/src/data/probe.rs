//! Reading an image's size and EXIF orientation from its headers, without
//! decoding pixels, so that planning 10,000 images takes seconds. Cheap
//! checks of the file's end catch most truncated files; a file that fails
//! them is decoded fully before it is accepted or rejected.

use super::source::RandomAccess;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Webp,
    Bmp,
}

/// What the headers say about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    /// Size as stored, before EXIF orientation.
    pub stored_size: [u32; 2],
    /// EXIF orientation (1 = as stored; 5..=8 swap width and height).
    pub orientation: u8,
    /// The image may have transparency (composited on white when loaded).
    pub may_have_alpha: bool,
    /// The end of the file does not look like a complete image: decode it
    /// fully to find out.
    pub suspect_truncated: bool,
}

impl ImageInfo {
    /// Size after applying the EXIF orientation: what SimpleTuner calls the
    /// original size (it applies `exif_transpose` first).
    pub fn oriented_size(&self) -> [u32; 2] {
        let [w, h] = self.stored_size;
        if (5..=8).contains(&self.orientation) {
            [h, w]
        } else {
            [w, h]
        }
    }
}

/// Why a file is not a usable image.
pub type SkipReason = String;

/// The most pixels an image may have before it is skipped, unread: Pillow's
/// `Image.MAX_IMAGE_PIXELS` (the decoded RGB image is about 512 MiB). A
/// header can claim any size, and decoding allocates what it claims.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// Reads the headers of one file; images of more than `max_pixels` pixels
/// are skipped with a reason.
pub fn probe(file: &mut dyn RandomAccess, max_pixels: u64) -> Result<std::result::Result<ImageInfo, SkipReason>> {
    Ok(probe_headers(file)?.and_then(|info| {
        let [width, height] = info.stored_size;
        let pixels = width as u64 * height as u64;
        if pixels > max_pixels {
            return Err(format!(
                "too many pixels: {width}x{height} is {:.1} MP, over the limit of {:.1} MP (max_image_pixels); not decoded",
                pixels as f64 / 1e6,
                max_pixels as f64 / 1e6
            ));
        }
        Ok(info)
    }))
}

fn probe_headers(file: &mut dyn RandomAccess) -> Result<std::result::Result<ImageInfo, SkipReason>> {
    let length = file.len();
    if length == 0 {
        return Ok(Err("empty file (0 bytes)".into()));
    }
    let head = file.read_at(0, 64)?;
    let result = if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        probe_jpeg(file, length)?
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        probe_png(file, length)?
    } else if head.len() >= 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        probe_webp(file, length)?
    } else if head.starts_with(b"BM") {
        probe_bmp(&head, length)
    } else {
        Err("not an image (content is not PNG, JPEG, WebP or BMP)".into())
    };
    Ok(result)
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn le16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn le24(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], 0])
}

fn probe_jpeg(file: &mut dyn RandomAccess, length: u64) -> Result<std::result::Result<ImageInfo, SkipReason>> {
    let mut position = 2u64;
    let mut orientation = 1;
    loop {
        let marker = file.read_at(position, 4)?;
        if marker.len() < 4 {
            return Ok(Err("truncated JPEG (ends before the image size is given)".into()));
        }
        if marker[0] != 0xFF {
            return Ok(Err(format!("corrupt JPEG (no marker at byte {position})")));
        }
        let code = marker[1];
        if code == 0xFF {
            position += 1; // fill byte
            continue;
        }
        if (0xD0..=0xD9).contains(&code) || code == 0x01 {
            position += 2; // markers without a length
            continue;
        }
        let segment_length = be16(&marker, 2) as u64;
        if segment_length < 2 {
            return Ok(Err(format!("corrupt JPEG (bad segment length at byte {position})")));
        }
        let is_start_of_frame = matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC);
        if is_start_of_frame {
            let frame = file.read_at(position + 4, 5)?;
            if frame.len() < 5 {
                return Ok(Err("truncated JPEG (ends inside the frame header)".into()));
            }
            let (height, width) = (be16(&frame, 1) as u32, be16(&frame, 3) as u32);
            if width == 0 || height == 0 {
                return Ok(Err(format!("corrupt JPEG (size {width}x{height})")));
            }
            let tail = file.read_at(length.saturating_sub(32), 32)?;
            let ends_with_eoi = tail.windows(2).any(|w| w == [0xFF, 0xD9]);
            return Ok(Ok(ImageInfo {
                format: ImageFormat::Jpeg,
                stored_size: [width, height],
                orientation,
                may_have_alpha: false,
                suspect_truncated: !ends_with_eoi,
            }));
        }
        if code == 0xE1 {
            let exif = file.read_at(position + 4, (segment_length as usize - 2).min(8192))?;
            if let Some(rest) = exif.strip_prefix(b"Exif\0\0") {
                orientation = exif_orientation(rest).unwrap_or(1);
            }
        }
        position += 2 + segment_length;
        if position >= length {
            return Ok(Err("truncated JPEG (ends before the image size is given)".into()));
        }
    }
}

/// The orientation tag (0x0112) of a TIFF-structured EXIF block.
pub fn exif_orientation(tiff: &[u8]) -> Option<u8> {
    if tiff.len() < 8 {
        return None;
    }
    let little = match &tiff[0..4] {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let read16 = |i: usize| if little { le16(tiff, i) } else { be16(tiff, i) };
    let read32 = |i: usize| if little { le32(tiff, i) } else { be32(tiff, i) };
    // Offsets come from the file: checked arithmetic, since usize is 32
    // bits on wasm32 and an offset near 4 GiB would wrap.
    let ifd = usize::try_from(read32(4)).ok()?;
    if ifd.checked_add(2)? > tiff.len() {
        return None;
    }
    let count = read16(ifd) as usize;
    for entry in 0..count {
        let at = ifd.checked_add(2)?.checked_add(entry.checked_mul(12)?)?;
        if at.checked_add(12)? > tiff.len() {
            return None;
        }
        if read16(at) == 0x0112 {
            let value = read16(at + 8);
            return (1..=8).contains(&value).then_some(value as u8);
        }
    }
    None
}

fn probe_png(file: &mut dyn RandomAccess, length: u64) -> Result<std::result::Result<ImageInfo, SkipReason>> {
    let header = file.read_at(8, 25)?;
    if header.len() < 25 || &header[4..8] != b"IHDR" {
        return Ok(Err("corrupt PNG (no IHDR header)".into()));
    }
    let (width, height) = (be32(&header, 8), be32(&header, 12));
    if width == 0 || height == 0 {
        return Ok(Err(format!("corrupt PNG (size {width}x{height})")));
    }
    let color_type = header[17];
    let mut may_have_alpha = matches!(color_type, 4 | 6);
    let mut orientation = 1;
    // Walk the chunks before the pixel data for transparency and EXIF.
    let mut position = 8u64;
    for _ in 0..64 {
        let chunk = file.read_at(position, 8)?;
        if chunk.len() < 8 {
            break;
        }
        let chunk_length = be32(&chunk, 0) as u64;
        match &chunk[4..8] {
            b"IDAT" | b"IEND" => break,
            b"tRNS" => may_have_alpha = true,
            b"eXIf" => {
                let exif = file.read_at(position + 8, (chunk_length as usize).min(8192))?;
                orientation = exif_orientation(&exif).unwrap_or(1);
            }
            _ => {}
        }
        position += 12 + chunk_length;
    }
    let tail = file.read_at(length.saturating_sub(12), 12)?;
    let complete = tail.len() == 12 && &tail[4..8] == b"IEND";
    Ok(Ok(ImageInfo { format: ImageFormat::Png, stored_size: [width, height], orientation, may_have_alpha, suspect_truncated: !complete }))
}

fn probe_webp(file: &mut dyn RandomAccess, length: u64) -> Result<std::result::Result<ImageInfo, SkipReason>> {
    let head = file.read_at(0, 30)?;
    if head.len() < 30 {
        return Ok(Err("truncated WebP (header incomplete)".into()));
    }
    let riff_size = le32(&head, 4) as u64 + 8;
    if length < riff_size {
        return Ok(Err(format!("truncated WebP ({length} of {riff_size} bytes)")));
    }
    let mut orientation = 1;
    let mut may_have_alpha = false;
    let (width, height) = match &head[12..16] {
        b"VP8 " => {
            if head[23..26] != [0x9D, 0x01, 0x2A] {
                return Ok(Err("corrupt WebP (bad VP8 frame header)".into()));
            }
            ((le16(&head, 26) & 0x3FFF) as u32, (le16(&head, 28) & 0x3FFF) as u32)
        }
        b"VP8L" => {
            if head[20] != 0x2F {
                return Ok(Err("corrupt WebP (bad VP8L signature)".into()));
            }
            let bits = le32(&head, 21);
            may_have_alpha = (bits >> 28) & 1 == 1;
            ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        }
        b"VP8X" => {
            let flags = head[20];
            may_have_alpha = flags & 0x10 != 0;
            if flags & 0x08 != 0 {
                orientation = webp_exif_orientation(file, length)?.unwrap_or(1);
            }
            (le24(&head, 24) + 1, le24(&head, 27) + 1)
        }
        _ => return Ok(Err("corrupt WebP (unknown chunk)".into())),
    };
    Ok(Ok(ImageInfo { format: ImageFormat::Webp, stored_size: [width, height], orientation, may_have_alpha, suspect_truncated: false }))
}

fn webp_exif_orientation(file: &mut dyn RandomAccess, length: u64) -> Result<Option<u8>> {
    let mut position = 12u64;
    while position + 8 <= length {
        let chunk = file.read_at(position, 8)?;
        let size = le32(&chunk, 4) as u64;
        if &chunk[0..4] == b"EXIF" {
            let exif = file.read_at(position + 8, (size as usize).min(8192))?;
            let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(&exif);
            return Ok(exif_orientation(tiff));
        }
        position += 8 + size + (size & 1);
    }
    Ok(None)
}

fn probe_bmp(head: &[u8], length: u64) -> std::result::Result<ImageInfo, SkipReason> {
    if head.len() < 26 {
        return Err("truncated BMP (header incomplete)".into());
    }
    let declared = le32(head, 2) as u64;
    if declared > length {
        return Err(format!("truncated BMP ({length} of {declared} bytes)"));
    }
    let header_size = le32(head, 14);
    let (width, height) = if header_size == 12 {
        (le16(head, 18) as u32, le16(head, 20) as u32)
    } else {
        // A negative height means rows are stored top-down.
        ((le32(head, 18) as i32).unsigned_abs(), (le32(head, 22) as i32).unsigned_abs())
    };
    if width == 0 || height == 0 {
        return Err(format!("corrupt BMP (size {width}x{height})"));
    }
    let bits = if head.len() >= 30 { le16(head, 28) } else { 24 };
    Ok(ImageInfo { format: ImageFormat::Bmp, stored_size: [width, height], orientation: 1, may_have_alpha: bits == 32, suspect_truncated: false })
}
