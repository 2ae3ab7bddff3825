//! Wildcards in the prompt: `a {red|blue|green} fox` reads as one of the
//! options, chosen by the image's seed. Turbo draws nearly the same picture
//! for every seed, so images at seed, seed+1, … (the app's variations grid,
//! a loop over `zimage generate --seed`) of a prompt with wildcards are how
//! to explore ideas; each image records the prompt it was drawn from,
//! options resolved, so it reproduces anywhere.
//!
//! A group is `{` … `}` holding at least one `|`; braces without a `|` (or
//! never closed) are ordinary text. Groups do not nest: a `{` inside a group
//! starts the group afresh.

/// One piece of a prompt: text as written, or a group's options.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Group(Vec<&'a str>),
}

fn pieces(template: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let inner = &after[..close];
        // "{a|{b|c}" : the group is the last `{` before the `}`.
        if let Some(reopen) = inner.rfind('{') {
            out.push(Piece::Text(&rest[..open + 1 + reopen]));
            rest = &rest[open + 1 + reopen..];
            continue;
        }
        if !inner.contains('|') {
            out.push(Piece::Text(&rest[..open + 1 + close + 1]));
        } else {
            out.push(Piece::Text(&rest[..open]));
            out.push(Piece::Group(inner.split('|').collect()));
        }
        rest = &after[close + 1..];
    }
    out.push(Piece::Text(rest));
    out
}

/// The option of each group for `seed`: the same seed always reads the same.
fn choice(seed: u64, group: usize, options: usize) -> usize {
    // SplitMix64 of the seed and the group's index: stable across platforms and versions.
    let mut z = seed ^ (group as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z % options as u64) as usize
}

/// The prompt `template` reads for `seed`: every group replaced by one of
/// its options. A prompt without groups comes back as it is.
pub fn resolve(template: &str, seed: u64) -> String {
    let mut group = 0;
    pieces(template)
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => t,
            Piece::Group(options) => {
                let pick = options[choice(seed, group, options.len())];
                group += 1;
                pick
            }
        })
        .collect()
}

/// How many groups `template` has and how many prompts they make (saturating).
pub fn count(template: &str) -> (usize, u64) {
    pieces(template).iter().fold((0, 1), |(groups, prompts), p| match p {
        Piece::Group(options) => (groups + 1, prompts.saturating_mul(options.len() as u64)),
        Piece::Text(_) => (groups, prompts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_without_groups_is_kept_as_written() {
        for p in ["a red fox", "", "json {\"a\": 1}", "an open { brace", "a | pipe", "}{", "{x}"] {
            assert_eq!(resolve(p, 7), p);
            assert_eq!(count(p), (0, 1), "{p}");
        }
    }

    #[test]
    fn each_seed_reads_one_option_of_each_group_and_always_the_same() {
        let t = "a {red|blue|green} {fox|owl} at dusk";
        assert_eq!(count(t), (2, 6));
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let p = resolve(t, seed);
            assert_eq!(p, resolve(t, seed), "deterministic");
            let words: Vec<&str> = p.split(' ').collect();
            assert_eq!(words.len(), 5, "{p}");
            assert!(["red", "blue", "green"].contains(&words[1]) && ["fox", "owl"].contains(&words[2]), "{p}");
            seen.insert(p);
        }
        assert_eq!(seen.len(), 6, "64 seeds reach every combination");
        // The two groups are not tied together: their picks differ in order.
        let first: Vec<usize> = (0..16).map(|s| choice(s, 0, 2)).collect();
        let second: Vec<usize> = (0..16).map(|s| choice(s, 1, 2)).collect();
        assert_ne!(first, second);
    }

    #[test]
    fn empty_options_and_odd_braces_read_sensibly() {
        // An empty option drops the word: "a {|very }big dog".
        let reads: std::collections::HashSet<String> = (0..32).map(|s| resolve("a {|very }big dog", s)).collect();
        assert_eq!(reads, ["a big dog".to_string(), "a very big dog".to_string()].into_iter().collect());
        // A brace opened again inside: the inner group counts, the outer brace is text.
        assert_eq!(count("a {b|{c|d} e"), (1, 2));
        assert!(["a {b|c e", "a {b|d e"].contains(&resolve("a {b|{c|d} e", 3).as_str()));
        // Text around and between groups is kept, unicode included.
        assert!(["狐 x·a", "狐 x·b"].contains(&resolve("狐 x·{a|b}", 1).as_str()));
    }
}
