//! Screenshots: every backend hands back PNG. QEMU (through libvirt) dumps a PPM, which is
//! converted here; VirtualBox and VMware write PNG themselves, which is checked and measured.

use crate::types::Screenshot as Png;

/// Screens larger than this are not screens.
const MAX_SIDE: u32 = 16384;

/// One whitespace-delimited token of a PPM header, skipping `#` comments.
fn token<'a>(data: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    loop {
        while *at < data.len() && data[*at].is_ascii_whitespace() {
            *at += 1;
        }
        if data.get(*at) == Some(&b'#') {
            while *at < data.len() && data[*at] != b'\n' {
                *at += 1;
            }
            continue;
        }
        break;
    }
    let start = *at;
    while *at < data.len() && !data[*at].is_ascii_whitespace() {
        *at += 1;
    }
    (*at > start).then(|| &data[start..*at])
}

fn number(data: &[u8], at: &mut usize) -> Option<u32> {
    std::str::from_utf8(token(data, at)?).ok()?.parse().ok()
}

/// A binary PPM (P6, 8-bit) as PNG.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Png, String> {
    let mut at = 0;
    if token(ppm, &mut at) != Some(b"P6".as_slice()) {
        return Err("not a binary PPM (P6) image".into());
    }
    let (w, h, max) = match (
        number(ppm, &mut at),
        number(ppm, &mut at),
        number(ppm, &mut at),
    ) {
        (Some(w), Some(h), Some(m)) => (w, h, m),
        _ => return Err("PPM header without width, height and maximum value".into()),
    };
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!("PPM of {w}x{h} pixels"));
    }
    if max != 255 {
        return Err(format!(
            "PPM with maximum value {max} (only 255 is produced by QEMU)"
        ));
    }
    // One whitespace byte ends the header.
    let pixels = ppm.get(at + 1..).unwrap_or_default();
    let need = w as usize * h as usize * 3;
    if pixels.len() < need {
        return Err(format!(
            "PPM of {w}x{h} has {} bytes of pixels, not {need}",
            pixels.len()
        ));
    }
    let mut data = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut data, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| e.to_string())?;
        wr.write_image_data(&pixels[..need])
            .map_err(|e| e.to_string())?;
    }
    Ok(Png {
        png: data,
        width: w,
        height: h,
    })
}

/// A PNG written by a hypervisor tool: checked to be one, with its size.
pub fn check_png(data: Vec<u8>) -> Result<Png, String> {
    let dec = png::Decoder::new(std::io::Cursor::new(&data));
    let reader = dec
        .read_info()
        .map_err(|e| format!("not a PNG image: {e}"))?;
    let (width, height) = (reader.info().width, reader.info().height);
    Ok(Png {
        png: data,
        width,
        height,
    })
}

/// Whether the picture shows anything: some pixel differs from the first one.
pub fn is_blank(png: &Png) -> Result<bool, String> {
    let dec = png::Decoder::new(std::io::Cursor::new(&png.png));
    let mut reader = dec.read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let px = info.color_type.samples() * (info.bit_depth as usize).div_ceil(8);
    let pixels = &buf[..info.buffer_size()];
    let first = &pixels[..px.min(pixels.len())];
    Ok(pixels.chunks(px).all(|p| p == first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let mut v = format!("P6\n# made by a test\n{w} {h}\n255\n").into_bytes();
        for y in 0..h {
            for x in 0..w {
                v.extend(f(x, y));
            }
        }
        v
    }

    #[test]
    fn ppm_becomes_a_png_of_the_same_size_and_pixels() {
        let png = ppm_to_png(&ppm(7, 3, |x, y| [x as u8 * 30, y as u8 * 80, 9])).unwrap();
        assert_eq!((png.width, png.height), (7, 3));
        assert_eq!(&png.png[1..4], b"PNG");
        let checked = check_png(png.png.clone()).unwrap();
        assert_eq!((checked.width, checked.height), (7, 3));
        assert!(!is_blank(&png).unwrap());
        let flat = ppm_to_png(&ppm(4, 4, |_, _| [1, 2, 3])).unwrap();
        assert!(is_blank(&flat).unwrap());
    }

    #[test]
    fn bad_images_are_errors_not_panics() {
        for bad in [
            b"".to_vec(),
            b"P3\n1 1\n255\n0 0 0".to_vec(),
            b"P6\n".to_vec(),
            b"P6\n2 2\n255\n\x00\x00".to_vec(),
            b"P6\n0 5\n255\n".to_vec(),
            b"P6\n99999 1\n255\n".to_vec(),
            b"P6\n1 1\n65535\n\x00\x00\x00\x00\x00\x00".to_vec(),
        ] {
            assert!(ppm_to_png(&bad).is_err(), "{bad:?}");
        }
        assert!(check_png(b"\x89PNG\r\n\x1a\nbroken".to_vec()).is_err());
    }
}
