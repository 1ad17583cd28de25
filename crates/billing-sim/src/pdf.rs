//! The invoices' PDF files.

/// A minimal one-page PDF 1.4 (Helvetica, WinAnsi) whose xref offsets are computed, so that
/// strict readers open it without repairing it.
pub(crate) fn build_pdf(lines: &[String]) -> Vec<u8> {
    let text = |s: &str| -> Vec<u8> {
        let byte = |c: char| match c {
            '(' | ')' | '\\' => vec![b'\\', c as u8],
            '\u{2014}' => vec![0x97], // the em dash in WinAnsiEncoding
            ' '..='~' => vec![c as u8],
            _ => vec![b'?'],
        };
        s.chars().flat_map(byte).collect()
    };
    let mut content = b"BT /F1 16 Tf 22 TL 56 780 Td".to_vec();
    for (n, line) in lines.iter().enumerate() {
        content.extend_from_slice(if n == 1 { b" /F1 11 Tf T* (" } else { b" T* (" });
        content.extend(text(line));
        content.extend_from_slice(b") Tj");
    }
    content.extend_from_slice(b" ET");
    let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
    stream.extend(content);
    stream.extend_from_slice(b"\nendstream");
    #[rustfmt::skip]
    let objects: [&[u8]; 5] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        &stream,
    ];
    // The binary comment line tells transfer tools the file is binary.
    let mut pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (n, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend(format!("{} 0 obj\n", n + 1).bytes());
        pdf.extend_from_slice(body);
        pdf.extend_from_slice(b"\nendobj\n");
    }
    let (xref, size) = (pdf.len(), objects.len() + 1);
    pdf.extend(format!("xref\n0 {size}\n0000000000 65535 f \n").bytes());
    for o in offsets {
        pdf.extend(format!("{o:010} 00000 n \n").bytes());
    }
    let trailer = format!("trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n");
    pdf.extend(trailer.bytes());
    pdf
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn pdf_xref_offsets_point_at_their_objects() {
        let pdf = build_pdf(&["Invoice 1 \u{2014} (Acme)".to_owned()]);
        let find = |needle: &[u8]| pdf.windows(needle.len()).position(|w| w == needle).unwrap();
        let text = String::from_utf8_lossy(&pdf).into_owned();
        assert!(pdf.starts_with(b"%PDF-1.4\n") && text.ends_with("%%EOF\n"));
        let startxref = text
            .rsplit("startxref\n")
            .next()
            .unwrap()
            .trim_end_matches("\n%%EOF\n");
        let startxref: usize = startxref.parse().unwrap();
        assert_eq!(startxref, find(b"xref\n0 6\n"));
        for n in 1..6 {
            let entry = &pdf[startxref + 9 + n * 20..][..20];
            let entry = std::str::from_utf8(entry).unwrap();
            assert!(entry.ends_with(" 00000 n \n"), "{entry:?}");
            let offset: usize = entry[..10].parse().unwrap();
            assert!(pdf[offset..].starts_with(format!("{n} 0 obj\n").as_bytes()));
        }
        let length = text
            .split("/Length ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let body = find(b"\nendstream") - (find(b"stream\n") + 7);
        assert_eq!(length.parse::<usize>().unwrap(), body);
        assert!(pdf.windows(2).any(|w| w == b" \x97"), "em dash in WinAnsi");
        assert!(text.contains("\\(Acme\\)"));
    }
}
