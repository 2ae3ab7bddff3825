//! The prompts the user settled on, recalled with Alt+↑ / Alt+↓ in the
//! prompt box (as a shell's history) and kept across restarts in
//! `prompts.json`. Users lose prompts when they delete the image that held
//! them (InvokeAI#2379, #8336); the image history also prunes unmarked live
//! images, so the prompts are kept on their own.
//!
//! A prompt is recorded when the user acts on it (generate, refine,
//! variations, save) or when its live image has been on screen for
//! [`SETTLE`] without an edit; the states typed through on the way are not.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a live image's prompt must stay unedited to be recorded.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Oldest prompts beyond this many are dropped.
pub const MAX_PROMPTS: usize = 500;

#[derive(Debug, Default, Serialize, Deserialize)]
struct PromptsFile {
    version: u32,
    /// Oldest first.
    prompts: Vec<String>,
}

#[derive(Debug, Default)]
pub struct PromptHistory {
    /// Oldest first, no duplicates.
    prompts: Vec<String>,
    /// Index into `prompts` while the user walks the history.
    cursor: Option<usize>,
    /// What was in the box when the walk began, given back past the newest.
    draft: String,
}

impl PromptHistory {
    pub fn new(prompts: Vec<String>) -> Self {
        let mut h = Self::default();
        for p in prompts {
            h.record(&p);
        }
        h
    }

    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    /// Adds `prompt` as the newest (moving it there if it was recorded
    /// before); blank prompts are ignored. Returns whether anything changed.
    pub fn record(&mut self, prompt: &str) -> bool {
        if prompt.trim().is_empty() || self.prompts.last().is_some_and(|p| p == prompt) {
            return false;
        }
        self.prompts.retain(|p| p != prompt);
        self.prompts.push(prompt.to_string());
        if self.prompts.len() > MAX_PROMPTS {
            self.prompts.drain(..self.prompts.len() - MAX_PROMPTS);
        }
        self.cursor = None;
        true
    }

    /// Alt+↑: the prompt before the one shown (`current`, the box's text),
    /// or `None` at the oldest. The first step skips a newest prompt equal
    /// to `current`, which would show no change.
    pub fn older(&mut self, current: &str) -> Option<String> {
        let next = match self.cursor {
            Some(0) => return None,
            Some(i) => i - 1,
            None => {
                let newest = self.prompts.len().checked_sub(1)?;
                let skip = usize::from(self.prompts[newest] == current);
                let i = newest.checked_sub(skip)?;
                self.draft = current.to_string();
                i
            }
        };
        self.cursor = Some(next);
        Some(self.prompts[next].clone())
    }

    /// Alt+↓: the prompt after the one shown; past the newest, the text the
    /// walk began with. `None` when not walking.
    pub fn newer(&mut self) -> Option<String> {
        let i = self.cursor?;
        if i + 1 < self.prompts.len() {
            self.cursor = Some(i + 1);
            Some(self.prompts[i + 1].clone())
        } else {
            self.cursor = None;
            Some(std::mem::take(&mut self.draft))
        }
    }

    /// The user edited the box: the walk ends where it is.
    pub fn edited(&mut self) {
        self.cursor = None;
    }

    /// Reads `path`; a missing file is an empty history, a damaged one too,
    /// with a warning (the file is kept aside, never overwritten silently).
    pub fn load(path: &std::path::Path) -> (Self, Option<String>) {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Self::default(), None),
            Err(e) => return (Self::default(), Some(format!("cannot read the prompt history {}: {e}", path.display()))),
        };
        match serde_json::from_str::<PromptsFile>(&text) {
            Ok(f) => (Self::new(f.prompts), None),
            Err(e) => {
                let aside = path.with_extension("json.damaged");
                let _ = std::fs::rename(path, &aside);
                (Self::default(), Some(format!("the prompt history was damaged ({e}); kept it as {}", aside.display())))
            }
        }
    }

    /// The file's bytes, for the disk thread.
    pub fn to_json(&self) -> Vec<u8> {
        let file = PromptsFile { version: 1, prompts: self.prompts.clone() };
        serde_json::to_vec_pretty(&file).unwrap_or_default()
    }
}

/// Where the prompt history lives in the data folder.
pub fn prompts_file(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("prompts.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_back_and_forth_and_returns_to_the_draft() {
        let mut h = PromptHistory::new(vec!["a fox".into(), "a heron".into(), "a kite".into()]);
        assert_eq!(h.newer(), None, "not walking yet");
        assert_eq!(h.older("a half-typed dr").as_deref(), Some("a kite"));
        assert_eq!(h.older("a kite").as_deref(), Some("a heron"));
        assert_eq!(h.older("a heron").as_deref(), Some("a fox"));
        assert_eq!(h.older("a fox"), None, "the oldest stays");
        assert_eq!(h.newer().as_deref(), Some("a heron"));
        assert_eq!(h.newer().as_deref(), Some("a kite"));
        assert_eq!(h.newer().as_deref(), Some("a half-typed dr"));
        assert_eq!(h.newer(), None);
    }

    #[test]
    fn the_first_step_skips_the_prompt_already_shown() {
        let mut h = PromptHistory::new(vec!["a fox".into(), "a heron".into()]);
        assert_eq!(h.older("a heron").as_deref(), Some("a fox"));
        let mut one = PromptHistory::new(vec!["a fox".into()]);
        assert_eq!(one.older("a fox"), None);
        assert_eq!(PromptHistory::default().older("x"), None);
    }

    #[test]
    fn recording_moves_repeats_to_the_newest_ignores_blanks_and_keeps_a_bounded_list() {
        let mut h = PromptHistory::new(vec!["a".into(), "b".into(), "c".into()]);
        assert!(h.record("a"));
        assert!(!h.record("a"), "already the newest");
        assert!(!h.record("   "));
        assert_eq!(h.prompts(), ["b", "c", "a"]);
        // An edit or a new record ends a walk.
        h.older("");
        h.record("d");
        assert_eq!(h.older("d").as_deref(), Some("a"));
        h.edited();
        assert_eq!(h.newer(), None);
        for i in 0..MAX_PROMPTS + 10 {
            h.record(&format!("p{i}"));
        }
        assert_eq!(h.prompts().len(), MAX_PROMPTS);
        assert_eq!(h.prompts().last().map(String::as_str), Some(format!("p{}", MAX_PROMPTS + 9).as_str()));
    }

    #[test]
    fn saves_loads_and_keeps_a_damaged_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = prompts_file(dir.path());
        assert!(PromptHistory::load(&path).0.prompts().is_empty());
        let h = PromptHistory::new(vec!["一只猫".into(), "a \"quoted\"\nprompt".into()]);
        std::fs::write(&path, h.to_json()).unwrap();
        let (back, warning) = PromptHistory::load(&path);
        assert_eq!((back.prompts(), warning), (h.prompts(), None));
        std::fs::write(&path, "{ not json").unwrap();
        let (empty, warning) = PromptHistory::load(&path);
        assert!(empty.prompts().is_empty());
        assert!(warning.unwrap().contains("prompt history was damaged"));
        assert!(path.with_extension("json.damaged").exists());
    }
}
