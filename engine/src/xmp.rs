//! XMP copy of the generation metadata, so that it survives editing.
//!
//! Image editors drop a PNG's private text chunks (`parameters`, `zimage`)
//! when they save, but keep its XMP packet, and carry it into the JPEGs they
//! export (A1111#8407, open since 2023). [`packet`] writes the same two texts
//! into XMP: the A1111 infotext as `dc:description` (what photo tools show as
//! the image's description) and the `zimage` JSON as `zimage:json`.
//! [`read_packet`] reads them back, from the packet as written or as an
//! editor rewrote it (prefixes renamed, properties moved into attributes).

/// PNG `iTXt` keyword of an XMP packet (as Adobe's XMP specification, part 3, says).
pub const PNG_KEYWORD: &str = "XML:com.adobe.xmp";

/// Namespace of the `zimage:json` property.
pub const ZIMAGE_NS: &str = "https://zimage.studio/ns/xmp/1.0/";
const DC_NS: &str = "http://purl.org/dc/elements/1.1/";
/// The header of a JPEG APP1 segment that holds XMP.
const JPEG_XMP_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// An XMP packet holding `description` (the A1111 infotext) and `json` (the
/// `zimage` JSON), plus the creating tool and date when known.
pub fn packet(description: &str, json: &str, creator: &str, created: &str) -> String {
    let mut props = String::new();
    if !creator.is_empty() {
        props.push_str(&format!("   <xmp:CreatorTool>{}</xmp:CreatorTool>\n", escape(creator)));
    }
    if !created.is_empty() {
        props.push_str(&format!("   <xmp:CreateDate>{}</xmp:CreateDate>\n", escape(created)));
    }
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
         \x20<rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
         \x20 <rdf:Description rdf:about=\"\"\n\
         \x20   xmlns:dc=\"{DC_NS}\"\n\
         \x20   xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\"\n\
         \x20   xmlns:zimage=\"{ZIMAGE_NS}\">\n\
         {props}\
         \x20  <dc:description><rdf:Alt><rdf:li xml:lang=\"x-default\">{}</rdf:li></rdf:Alt></dc:description>\n\
         \x20  <zimage:json>{}</zimage:json>\n\
         \x20 </rdf:Description>\n\
         \x20</rdf:RDF>\n\
         </x:xmpmeta>\n\
         <?xpacket end=\"w\"?>",
        escape(description),
        escape(json)
    )
}

/// What an XMP packet holds for us: the `zimage` JSON and the description
/// (A1111 infotext, or whatever an editor put there).
#[derive(Debug, Default, PartialEq)]
pub struct XmpTexts {
    pub json: Option<String>,
    pub description: Option<String>,
}

/// Finds our properties in `xmp`, whatever prefixes the file declares for
/// their namespaces, as elements or as attributes.
pub fn read_packet(xmp: &str) -> XmpTexts {
    let property = |ns: &str, name: &str| -> Option<String> {
        prefixes_of(xmp, ns).into_iter().find_map(|p| element_text(xmp, &format!("{p}:{name}")).or_else(|| attribute(xmp, &format!("{p}:{name}"))))
    };
    let json = property(ZIMAGE_NS, "json");
    // dc:description is a language alternative: the text of its first rdf:li.
    let description = property(DC_NS, "description").and_then(|d| {
        if d.contains(":li") {
            let start = d.find(":li")?;
            let open_end = start + d[start..].find('>')? + 1;
            let close = open_end + d[open_end..].find("</")?;
            Some(unescape(&d[open_end..close]))
        } else {
            // Already unescaped plain text (an attribute, or a simple value).
            Some(d)
        }
    });
    XmpTexts { json, description }
}

/// The JPEG APP1 segment (marker, length, header, packet) that carries
/// `packet`, to be placed among a JPEG's header segments; `None` when the
/// packet does not fit one segment (64 KiB).
pub fn jpeg_app1_segment(packet: &str) -> Option<Vec<u8>> {
    let len = u16::try_from(2 + JPEG_XMP_HEADER.len() + packet.len()).ok()?;
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&len.to_be_bytes());
    segment.extend_from_slice(JPEG_XMP_HEADER);
    segment.extend_from_slice(packet.as_bytes());
    Some(segment)
}

/// The XMP packet of a JPEG (its APP1 segment), if it has one.
pub fn jpeg_packet(bytes: &[u8]) -> Option<String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        // Markers without a length: RSTn and TEM; SOS ends the headers.
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let len = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        let body = bytes.get(at + 4..at + 2 + len)?;
        if marker == 0xE1 && body.starts_with(JPEG_XMP_HEADER) {
            return Some(String::from_utf8_lossy(&body[JPEG_XMP_HEADER.len()..]).into_owned());
        }
        at += 2 + len;
    }
    None
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            // XML 1.0 has no way to write the other control characters.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|e| *e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") || e.starts_with("#X") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The prefixes `xmp` declares for namespace `ns` (`xmlns:p="ns"`).
fn prefixes_of(xmp: &str, ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    for quote in ['"', '\''] {
        let needle = format!("={quote}{ns}{quote}");
        let mut from = 0;
        while let Some(i) = xmp[from..].find(&needle) {
            let at = from + i;
            let decl = &xmp[..at];
            if let Some(x) = decl.rfind("xmlns:") {
                let prefix = decl[x + 6..].trim();
                if !prefix.is_empty() && prefix.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.') {
                    out.push(prefix.to_string());
                }
            }
            from = at + needle.len();
        }
    }
    out
}

/// The raw content of the first `<name>…</name>` element (unescaped when
/// it is plain text, as is when it holds markup).
fn element_text(xmp: &str, name: &str) -> Option<String> {
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = xmp[from..].find(&open) {
        let start = from + i;
        let after = &xmp[start + open.len()..];
        // `<dc:description>` but not `<dc:descriptionX>`.
        if after.starts_with(['>', ' ', '\n', '\r', '\t']) {
            let gt = after.find('>')?;
            if after[..gt].ends_with('/') {
                return None;
            }
            let body = &after[gt + 1..];
            let close = body.find(&format!("</{name}>"))?;
            let content = &body[..close];
            return Some(if content.contains('<') { content.to_string() } else { unescape(content) });
        }
        from = start + open.len();
    }
    None
}

/// The unescaped value of the first `name="…"` attribute.
fn attribute(xmp: &str, name: &str) -> Option<String> {
    for quote in ['"', '\''] {
        let needle = format!("{name}={quote}");
        let mut from = 0;
        while let Some(i) = xmp[from..].find(&needle) {
            let at = from + i;
            // A whole attribute name, not the tail of a longer one.
            if xmp[..at].ends_with(char::is_whitespace) {
                let value = &xmp[at + needle.len()..];
                let end = value.find(quote)?;
                return Some(unescape(&value[..end]));
            }
            from = at + needle.len();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const AWKWARD: &str = "一只猫 <b>&amp; \"quoted\" 'single'\nline two\r\tend";

    #[test]
    fn round_trips_any_text() {
        let json = r#"{"prompt":"a <cat> & \"dog\"","seed":1}"#;
        let p = packet(AWKWARD, json, "Z-Image Studio 0.1.0", "2026-11-28T02:00:00Z");
        assert!(p.starts_with("<?xpacket begin=\"\u{feff}\""));
        let back = read_packet(&p);
        assert_eq!(back.json.as_deref(), Some(json));
        assert_eq!(back.description.as_deref(), Some(AWKWARD));
        // Control characters XML cannot carry become U+FFFD instead of breaking the packet.
        assert_eq!(read_packet(&packet("a\u{1}b", "{}", "", "")).description.as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn reads_packets_rewritten_by_an_editor() {
        // Other prefixes, properties as attributes, single quotes, other metadata around.
        let rewritten = r#"<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Adobe XMP Core 9.1">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
    xmlns:ns1='https://zimage.studio/ns/xmp/1.0/' xmlns:purl="http://purl.org/dc/elements/1.1/"
    photoshop:ColorMode="3" ns1:json="{&quot;seed&quot;:7}">
   <purl:description>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">a fox &amp; a hound</rdf:li>
    </rdf:Alt>
   </purl:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>"#;
        let back = read_packet(rewritten);
        assert_eq!(back.json.as_deref(), Some(r#"{"seed":7}"#));
        assert_eq!(back.description.as_deref(), Some("a fox & a hound"));
        assert_eq!(read_packet("<x:xmpmeta/>"), XmpTexts::default());
        assert_eq!(read_packet("garbage <zimage:json>"), XmpTexts::default());
    }

    #[test]
    fn never_panics_on_scrambled_packets() {
        // Concatenations of the pieces the reader looks for, in random order.
        let pieces = [
            "<", ">", "/", "&", ";", "&#x", "&#", "\"", "'", "=", " ", "一", "zimage:json", "z:json",
            "xmlns:z=\"https://zimage.studio/ns/xmp/1.0/\"", "xmlns:dc='http://purl.org/dc/elements/1.1/'",
            "dc:description", "rdf:li", ":li", "</", "<z:json>", "</z:json>", "<dc:description>", "xmlns:",
        ];
        let mut g = crate::rng::TorchGenerator::manual_seed(11);
        for _ in 0..20_000 {
            let n = (g.random() % 24) as usize;
            let text: String = (0..n).map(|_| pieces[(g.random() as usize) % pieces.len()]).collect();
            let _ = read_packet(&text);
            let mut jpeg = vec![0xFF, 0xD8];
            jpeg.extend((0..n).map(|_| [0xFF, 0xE1, 0x00, 0x01, 0x02, 0xDA][(g.random() as usize) % 6]));
            let _ = jpeg_packet(&jpeg);
        }
    }

    #[test]
    fn finds_the_packet_in_a_jpeg() {
        let p = packet("a kite", "{}", "", "");
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, b'J', b'F'];
        jpeg.extend(jpeg_app1_segment(&p).unwrap());
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0xFF, 0xD9]);
        assert!(jpeg_app1_segment(&"x".repeat(70_000)).is_none(), "one segment holds 64 KiB");
        assert_eq!(jpeg_packet(&jpeg).as_deref(), Some(p.as_str()));
        assert_eq!(jpeg_packet(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]), None, "no XMP before the image data");
        assert_eq!(jpeg_packet(&jpeg[..30]), None, "truncated");
        assert_eq!(jpeg_packet(b"not a jpeg"), None);
        assert_eq!(unescape("&#x4E00;&#20;&bogus; & &amp"), "一\u{14}&bogus; & &amp");
    }
}
