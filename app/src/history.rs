//! Every result with its full parameters and lineage, persisted in the data
//! folder: `history.json` plus one PNG per image (with the same metadata the
//! CLI writes, so an image restores its parameters even without the JSON).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use zimage_engine::metadata::{self, GenerationMetadata};
use zimage_engine::preview::RgbImage;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::engine_bridge::{BackgroundIo, IoResult, JobKind, ModelSlot};
use crate::settings::Paths;
use crate::state::Mark;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: String,
    pub slot: ModelSlot,
    pub job: JobKind,
    pub meta: GenerationMetadata,
    /// The image this one was made from (its history id): the Turbo image
    /// of a Base refine, or the live draft a full-size Turbo image finished.
    pub parent: Option<String>,
    #[serde(default)]
    pub mark: Mark,
    pub elapsed_ms: u64,
    /// File name inside the images folder.
    pub file: String,
    /// Where Save (Ctrl+S) last wrote it: saving again while that file is
    /// there says so instead of writing a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<PathBuf>,
}

impl HistoryEntry {
    /// Where it came from, in words: "refined from #000012" for a Base
    /// refine, "full size of draft #000011" for a live image finished from
    /// its draft; `None` for an image made from the prompt alone.
    pub fn lineage(&self) -> Option<String> {
        let parent = self.parent.as_ref()?;
        Some(match self.slot {
            ModelSlot::Base => format!("refined from #{parent}"),
            ModelSlot::Turbo => format!("full size of draft #{parent}"),
        })
    }

    /// Its lineage and whether Save wrote it, for the history list and the
    /// caption: "refined from #000012 · saved"; `None` when neither.
    pub fn notes(&self) -> Option<String> {
        let saved = self.saved.as_ref().map(|_| "saved".to_string());
        match (self.lineage(), saved) {
            (Some(l), Some(s)) => Some(format!("{l} · {s}")),
            (l, s) => l.or(s),
        }
    }
}

/// The index as read (its `version`, written as 1, has not changed yet).
#[derive(Debug, Default, Deserialize)]
struct HistoryFile {
    next_id: u64,
    entries: Vec<HistoryEntry>,
}

/// [`HistoryFile`] as written: borrowed from a snapshot of the entries.
#[derive(Serialize)]
struct HistoryFileOut<'a> {
    version: u32,
    next_id: u64,
    entries: Vec<&'a HistoryEntry>,
}

pub struct History {
    paths: Paths,
    next_id: u64,
    /// Shared, so that writing the index takes a snapshot of pointers on the
    /// UI thread and does the serialising (megabytes for a long history) on
    /// the disk thread; an entry changed meanwhile is copied first.
    entries: Vec<Arc<HistoryEntry>>,
    /// Where each id is in `entries`: a history of months is looked up every frame.
    index: HashMap<String, usize>,
    /// Counts the changes of the entries (added, removed, marked), for views
    /// that keep what they computed from them.
    revision: u64,
    /// When set, files are written on the disk thread (the app); else here (tests).
    io: Option<BackgroundIo>,
    /// The newest index write asked for: an older one still queued behind it
    /// is skipped, as the newer one writes everything it would.
    index_writes: Arc<AtomicU64>,
    /// Images not on disk yet: queued, or whose write failed (a full disk).
    /// They are shown from here and written again by [`Self::retry_writes`],
    /// so a full disk loses nothing while the app runs.
    unwritten: Arc<Mutex<HashMap<String, Unwritten>>>,
}

/// An image waiting for its file.
struct Unwritten {
    file: String,
    meta: GenerationMetadata,
    image: Arc<RgbImage>,
    /// A write of it is on the disk queue (else its last write failed).
    queued: bool,
}

/// Unmarked live results beyond this many are pruned (typing makes many).
const MAX_UNMARKED_LIVE: usize = 100;

/// A history file's readable entries, its `next_id` and how many entries
/// could not be read; `None` when it is not a history file at all.
fn readable_entries(text: &str) -> Option<(u64, Vec<HistoryEntry>, usize)> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let entries = value.get("entries")?.as_array()?;
    let next_id = value.get("next_id").and_then(|v| v.as_u64()).unwrap_or(1);
    let readable: Vec<HistoryEntry> =
        entries.iter().filter_map(|e| serde_json::from_value(e.clone()).ok()).collect();
    let unread = entries.len() - readable.len();
    Some((next_id, readable, unread))
}

impl History {
    /// Loads the history; a damaged file gives an empty history plus a warning,
    /// and the damaged file is kept aside (never overwritten silently); entries
    /// that cannot be read cost only themselves.
    pub fn load(paths: &Paths) -> (Self, Option<String>) {
        let file = paths.history_file();
        let at = |next_id: u64, entries: Vec<HistoryEntry>| {
            let mut h = Self {
                paths: paths.clone(),
                next_id,
                entries: entries.into_iter().map(Arc::new).collect(),
                index: HashMap::new(),
                revision: 0,
                io: None,
                index_writes: Arc::default(),
                unwritten: Arc::default(),
            };
            h.reindex();
            h
        };
        let empty = at(1, Vec::new());
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (empty, None),
            Err(e) => return (empty, Some(format!("cannot read the history {}: {e}", file.display()))),
        };
        let (e, (next_id, entries, unread)) = match serde_json::from_str::<HistoryFile>(&text) {
            Ok(h) => {
                let next_id = h.next_id.max(h.entries.len() as u64 + 1);
                return (at(next_id, h.entries), None);
            }
            Err(e) => match readable_entries(&text) {
                Some(readable) => (e, readable),
                None => {
                    let aside = file.with_extension("json.damaged");
                    let _ = std::fs::rename(&file, &aside);
                    return (empty, Some(format!("the history file was damaged ({e}); kept it as {}", aside.display())));
                }
            },
        };
        // Entries this version cannot read (a newer version's, a hand edit):
        // show the others, and keep a copy of the whole file.
        let copy = file.with_extension("json.unread");
        let _ = std::fs::write(&copy, &text);
        let warning = format!(
            "{unread} history entr{} could not be read ({e}); the others are shown, the whole file is kept as {}",
            if unread == 1 { "y" } else { "ies" },
            copy.display()
        );
        let next_id = next_id.max(entries.len() as u64 + 1);
        (at(next_id, entries), Some(warning))
    }

    pub fn set_io(&mut self, io: BackgroundIo) {
        self.io = Some(io);
    }

    pub fn io(&self) -> Option<&BackgroundIo> {
        self.io.as_ref()
    }

    /// Runs `task` on the disk thread if there is one, else now; errors come
    /// back through [`BackgroundIo::poll`] (or are returned when run here).
    fn run_io(&self, task: Box<dyn FnOnce() -> Result<()> + Send>) -> Result<()> {
        match &self.io {
            Some(io) => {
                io.run(Box::new(move || match task() {
                    Ok(()) => IoResult::Done,
                    Err(e) => IoResult::Error(crate::save::one_line_error(&e)),
                }));
                Ok(())
            }
            None => task(),
        }
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[Arc<HistoryEntry>] {
        &self.entries
    }

    /// Changes with every entry added, removed or changed.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn reindex(&mut self) {
        self.index = self.entries.iter().enumerate().map(|(i, e)| (e.id.clone(), i)).collect();
        self.revision += 1;
    }

    pub fn get(&self, id: &str) -> Option<&HistoryEntry> {
        self.index.get(id).map(|&i| &*self.entries[i])
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut HistoryEntry> {
        let i = *self.index.get(id)?;
        self.revision += 1;
        Some(Arc::make_mut(&mut self.entries[i]))
    }

    pub fn image_path(&self, entry: &HistoryEntry) -> PathBuf {
        self.paths.images_dir().join(&entry.file)
    }

    /// Adds a result: writes its PNG, then the index. Returns the new id; the
    /// entry is kept in memory even when writing fails (error returned too).
    pub fn add(&mut self, slot: ModelSlot, job: JobKind, meta: GenerationMetadata, parent: Option<String>, elapsed_ms: u64, image: Arc<RgbImage>) -> (String, Result<()>) {
        let id = format!("{:06}", self.next_id);
        self.next_id += 1;
        let file = format!("{id}-{}-{}.png", slot.label().to_lowercase(), meta.seed);
        let entry = HistoryEntry { id: id.clone(), slot, job, meta, parent, mark: Mark::None, elapsed_ms, file, saved: None };
        self.unwritten.lock().expect("unwritten").insert(
            id.clone(),
            Unwritten { file: entry.file.clone(), meta: entry.meta.clone(), image, queued: false },
        );
        let written = self.write_image(&id);
        self.index.insert(id.clone(), self.entries.len());
        self.entries.push(Arc::new(entry));
        self.revision += 1;
        self.prune();
        let saved = self.save();
        (id, written.and(saved))
    }

    /// Queues the write of the unwritten image `id`; it leaves
    /// [`Self::unwritten`] once its file is written.
    fn write_image(&self, id: &str) -> Result<()> {
        let (file, meta, image) = {
            let mut unwritten = self.unwritten.lock().expect("unwritten");
            let Some(u) = unwritten.get_mut(id) else { return Ok(()) };
            u.queued = true;
            (u.file.clone(), u.meta.clone(), u.image.clone())
        };
        let (dir, pending, id) = (self.paths.images_dir(), self.unwritten.clone(), id.to_string());
        self.run_io(Box::new(move || {
            let written = std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))
                .and_then(|()| metadata::save_png(&dir.join(&file), &image.pixels, image.width, image.height, &meta).map_err(anyhow::Error::from));
            let mut pending = pending.lock().expect("unwritten");
            match (&written, pending.get_mut(&id)) {
                (Ok(()), _) => drop(pending.remove(&id)),
                // Kept (unless removed meanwhile), to be written again by `retry_writes`.
                (Err(_), Some(u)) => u.queued = false,
                (Err(_), None) => {}
            }
            written
        }))
    }

    /// How many images are not on disk yet (queued or refused).
    pub fn unwritten(&self) -> usize {
        self.unwritten.lock().expect("unwritten").len()
    }

    /// How many images could not be written (their last write failed).
    pub fn failed_writes(&self) -> usize {
        self.unwritten.lock().expect("unwritten").values().filter(|u| !u.queued).count()
    }

    /// Writes again the images whose write failed, then the index; returns
    /// how many were queued.
    pub fn retry_writes(&self) -> usize {
        let failed: Vec<String> =
            self.unwritten.lock().expect("unwritten").iter().filter(|(_, u)| !u.queued).map(|(id, _)| id.clone()).collect();
        for id in &failed {
            let _ = self.write_image(id);
        }
        if !failed.is_empty() {
            let _ = self.save();
        }
        failed.len()
    }

    /// The image of `id` while its file is not written yet.
    fn unwritten_image(&self, id: &str) -> Option<Arc<RgbImage>> {
        self.unwritten.lock().expect("unwritten").get(id).map(|u| u.image.clone())
    }

    /// Reads an entry's image back from disk; the error is one line
    /// ([`unreadable_image`]).
    pub fn load_image(&self, entry: &HistoryEntry) -> Result<RgbImage> {
        if let Some(image) = self.unwritten_image(&entry.id) {
            return Ok((*image).clone());
        }
        let path = self.image_path(entry);
        read_rgb(&path).map_err(|e| anyhow::anyhow!(unreadable_image(&path, &e)))
    }

    fn prune(&mut self) {
        let parents = self.parents();
        let live_unmarked: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.job == JobKind::Live && e.mark == Mark::None && !parents.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        if live_unmarked.len() > MAX_UNMARKED_LIVE {
            let oldest = &live_unmarked[..live_unmarked.len() - MAX_UNMARKED_LIVE];
            self.forget(&oldest.iter().cloned().collect());
        }
    }

    /// The images something was made from (a Base refine, a live image
    /// finished from its draft).
    fn parents(&self) -> HashSet<&str> {
        self.entries.iter().filter_map(|c| c.parent.as_deref()).collect()
    }

    /// What "Clean up" removes: every rejected image, and the Turbo images
    /// left unmarked that nothing was made from and that are not `shown`;
    /// kept and starred images, the other Base images and the Turbo images
    /// they were refined from stay. Oldest first.
    pub fn cleanup_candidates(&self, shown: &[&str]) -> Vec<String> {
        let parents = self.parents();
        let unmarked_turbo = |e: &HistoryEntry| {
            e.mark == Mark::None && e.slot == ModelSlot::Turbo && !shown.contains(&e.id.as_str()) && !parents.contains(e.id.as_str())
        };
        self.entries.iter().filter(|e| e.mark == Mark::Rejected || unmarked_turbo(e)).map(|e| e.id.clone()).collect()
    }

    /// The bytes the images of `ids` take on disk.
    pub fn disk_bytes(&self, ids: &[String]) -> u64 {
        ids.iter().filter_map(|id| self.get(id)).filter_map(|e| std::fs::metadata(self.image_path(e)).ok()).map(|m| m.len()).sum()
    }

    /// Removes entries and their image files, then writes the index.
    pub fn remove(&mut self, ids: &HashSet<String>) -> Result<()> {
        self.forget(ids);
        self.save()
    }

    /// Drops entries from the index and deletes their files (through the
    /// disk queue, after any write of them still pending).
    fn forget(&mut self, ids: &HashSet<String>) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries).into_iter().partition(|e| ids.contains(&e.id));
        self.entries = kept;
        self.reindex();
        let mut unwritten = self.unwritten.lock().expect("unwritten");
        for e in &gone {
            unwritten.remove(&e.id);
        }
        drop(unwritten);
        for e in gone {
            let path = self.paths.images_dir().join(&e.file);
            let _ = self.run_io(Box::new(move || {
                let _ = std::fs::remove_file(path);
                Ok(())
            }));
        }
    }

    pub fn save(&self) -> Result<()> {
        let (next_id, snapshot) = (self.next_id, self.entries.clone());
        let (dir, path) = (self.paths.data_dir.clone(), self.paths.history_file());
        let (writes, this) = (self.index_writes.clone(), self.index_writes.fetch_add(1, Ordering::SeqCst) + 1);
        self.run_io(Box::new(move || {
            // Typing adds images faster than a long index is written: only the newest write is done.
            if writes.load(Ordering::SeqCst) != this {
                return Ok(());
            }
            let file = HistoryFileOut { version: 1, next_id, entries: snapshot.iter().map(|e| &**e).collect() };
            let json = serde_json::to_vec_pretty(&file)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            metadata::write_file_atomic(&path, &json)?;
            Ok(())
        }))
    }

    /// Decodes an entry's image on the disk thread, scaled down to
    /// `thumb_side` pixels on its longer side when given; arrives as
    /// [`IoResult::Loaded`] under `key`. Returns false when there is no disk thread.
    pub fn load_in_background(&self, entry: &HistoryEntry, key: String, thumb_side: Option<u32>) -> bool {
        let Some(io) = &self.io else { return false };
        let path = self.image_path(entry);
        let in_memory = self.unwritten_image(&entry.id);
        io.run(Box::new(move || match in_memory.map_or_else(|| read_rgb(&path), |i| Ok((*i).clone())) {
            Ok(image) => {
                let image = match thumb_side {
                    Some(side) => crate::images::thumbnail(&image, side),
                    None => image,
                };
                IoResult::Loaded { key, image }
            }
            Err(e) => IoResult::Unreadable { key, message: unreadable_image(&path, &e) },
        }));
        true
    }
}

/// Why a history image cannot be shown, in one line: its file is missing
/// (the usual case: moved or deleted by hand), or it cannot be decoded.
pub fn unreadable_image(path: &std::path::Path, e: &anyhow::Error) -> String {
    match std::fs::metadata(path) {
        Err(m) if m.kind() == std::io::ErrorKind::NotFound => format!("{} is missing (moved or deleted?)", path.display()),
        _ => crate::save::one_line_error(e),
    }
}

/// Decodes a PNG/JPEG/WebP file to RGB8, with a one-line error.
pub fn read_rgb(path: &std::path::Path) -> Result<RgbImage> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?.into_rgb8();
    Ok(RgbImage { width: img.width(), height: img.height(), pixels: img.into_raw() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> RgbImage {
        RgbImage { width: 4, height: 2, pixels: (0..24).collect() }
    }

    /// Index writes queued behind a busy disk thread are done once, from
    /// the newest snapshot: the file ends with every entry and every mark,
    /// including a change made after the writes were queued.
    #[test]
    fn queued_index_writes_end_with_the_newest_state() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let (mut h, _) = History::load(&paths);
        h.set_io(BackgroundIo::spawn(Arc::new(|| {})));
        let (release, hold) = std::sync::mpsc::channel::<()>();
        h.io().unwrap().run(Box::new(move || {
            let _ = hold.recv();
            IoResult::Done
        }));
        let meta = GenerationMetadata { prompt: "fox".into(), ..Default::default() };
        let ids: Vec<String> = (0..300)
            .map(|seed| {
                let meta = GenerationMetadata { seed, ..meta.clone() };
                h.add(ModelSlot::Turbo, JobKind::Variation, meta, None, 12, Arc::new(img())).0
            })
            .collect();
        assert!(!paths.history_file().exists(), "nothing written while the disk thread is busy");
        h.get_mut(&ids[7]).unwrap().mark = Mark::Starred;
        h.save().unwrap();
        release.send(()).unwrap();
        drop(h); // the disk thread finishes its queue
        let (back, warn) = History::load(&paths);
        assert!(warn.is_none());
        assert_eq!(back.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
        assert_eq!(back.get(&ids[7]).unwrap().mark, Mark::Starred);
        assert_eq!(back.entries[299].meta.seed, 299);
    }

    /// A deleted image file is said as missing; a damaged one names the file.
    #[test]
    fn an_image_file_gone_or_damaged_is_one_plain_line() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let (mut h, _) = History::load(&paths);
        let meta = GenerationMetadata { prompt: "fox".into(), ..Default::default() };
        let (a, _) = h.add(ModelSlot::Turbo, JobKind::Variation, meta.clone(), None, 12, Arc::new(img()));
        let (b, _) = h.add(ModelSlot::Turbo, JobKind::Variation, meta, None, 12, Arc::new(img()));
        let (pa, pb) = (h.image_path(h.get(&a).unwrap()), h.image_path(h.get(&b).unwrap()));
        std::fs::remove_file(&pa).unwrap();
        std::fs::write(&pb, b"not a picture").unwrap();
        let gone = h.load_image(h.get(&a).unwrap()).unwrap_err().to_string();
        assert_eq!(gone, format!("{} is missing (moved or deleted?)", pa.display()));
        let damaged = h.load_image(h.get(&b).unwrap()).unwrap_err().to_string();
        assert!(damaged.contains(&pb.display().to_string()) && !damaged.contains('\n'), "{damaged}");
    }

    /// Views keep what they computed until the revision moves: it moves with
    /// every entry added, changed or removed, and the id index follows.
    #[test]
    fn the_revision_and_the_index_follow_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, _) = History::load(&Paths::at(dir.path()));
        let meta = GenerationMetadata { prompt: "fox".into(), ..Default::default() };
        let mut last = h.revision();
        let mut moved = |h: &History| std::mem::replace(&mut last, h.revision()) != h.revision();
        let ids: Vec<String> =
            (0..3).map(|_| h.add(ModelSlot::Turbo, JobKind::Variation, meta.clone(), None, 1, Arc::new(img())).0).collect();
        assert!(moved(&h));
        h.get_mut(&ids[1]).unwrap().mark = Mark::Kept;
        assert!(moved(&h));
        h.remove(&HashSet::from([ids[0].clone()])).unwrap();
        assert!(moved(&h));
        assert!(h.get(&ids[0]).is_none());
        assert_eq!(h.get(&ids[1]).unwrap().mark, Mark::Kept, "the index follows the removal");
        assert_eq!(h.get(&ids[2]).unwrap().id, ids[2]);
        assert!(!moved(&h), "reading changes nothing");
    }

    #[test]
    fn history_persists_with_lineage_and_images() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let (mut h, warn) = History::load(&paths);
        assert!(warn.is_none() && h.entries.is_empty());
        let meta = GenerationMetadata { prompt: "fox".into(), seed: 3, ..Default::default() };
        let (t, r) = h.add(ModelSlot::Turbo, JobKind::Live, meta.clone(), None, 12, Arc::new(img()));
        r.unwrap();
        let (b, r) = h.add(ModelSlot::Base, JobKind::Refine, meta, Some(t.clone()), 40, Arc::new(img()));
        r.unwrap();
        h.get_mut(&t).unwrap().mark = Mark::Starred;
        h.save().unwrap();

        let (mut h2, warn) = History::load(&paths);
        assert!(warn.is_none());
        assert_eq!(h2.entries.len(), 2);
        assert_eq!(h2.get(&b).unwrap().parent.as_deref(), Some(t.as_str()));
        assert_eq!(h2.get(&b).unwrap().lineage(), Some(format!("refined from #{t}")));
        assert_eq!(h2.get(&t).unwrap().lineage(), None, "made from the prompt alone");
        assert_eq!(h2.get(&t).unwrap().notes(), None);
        h2.get_mut(&b).unwrap().saved = Some("/out/x.png".into());
        assert_eq!(h2.get(&b).unwrap().notes(), Some(format!("refined from #{t} · saved")));
        assert_eq!(h2.get(&t).unwrap().mark, Mark::Starred);
        assert_eq!(h2.load_image(h2.get(&b).unwrap()).unwrap(), img());
        // The PNG carries the parameters too.
        let m = metadata::read_png_metadata_file(&h2.image_path(h2.get(&t).unwrap())).unwrap();
        assert_eq!(m.prompt, "fox");
    }

    /// A live image finished at full size from its draft is not a refine.
    #[test]
    fn a_full_size_live_image_names_its_draft() {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, _) = History::load(&Paths::at(dir.path()));
        let meta = GenerationMetadata::default();
        let (draft, _) = h.add(ModelSlot::Turbo, JobKind::Live, meta.clone(), None, 1, Arc::new(img()));
        let (full, _) = h.add(ModelSlot::Turbo, JobKind::Live, meta, Some(draft.clone()), 1, Arc::new(img()));
        assert_eq!(h.get(&full).unwrap().lineage(), Some(format!("full size of draft #{draft}")));
    }

    #[test]
    fn damaged_history_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        std::fs::write(paths.history_file(), "garbage").unwrap();
        let (h, warn) = History::load(&paths);
        assert!(h.entries.is_empty());
        assert!(warn.unwrap().contains("damaged"));
        assert!(dir.path().join("history.json.damaged").is_file());
    }

    #[test]
    fn unreadable_entries_cost_only_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let (mut h, _) = History::load(&paths);
        let (a, _) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        let (b, _) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        let text = std::fs::read_to_string(paths.history_file()).unwrap();
        // A newer version's kind of job in the first entry.
        let edited = text.replacen("\"Live\"", "\"Sketch\"", 1);
        assert_ne!(edited, text);
        std::fs::write(paths.history_file(), &edited).unwrap();
        let (back, warn) = History::load(&paths);
        assert_eq!(back.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), std::slice::from_ref(&b));
        assert!(back.get(&a).is_none());
        let warn = warn.unwrap();
        assert!(warn.starts_with("1 history entry could not be read"), "{warn}");
        assert_eq!(std::fs::read_to_string(dir.path().join("history.json.unread")).unwrap(), edited);
        assert!(back.next_id > 2, "new ids never reuse the unread ones");
    }

    #[test]
    fn unmarked_live_results_are_pruned_but_kept_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut h, _) = History::load(&Paths::at(dir.path()));
        let (first, _) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        h.get_mut(&first).unwrap().mark = Mark::Kept;
        for _ in 0..MAX_UNMARKED_LIVE + 5 {
            let _ = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        }
        assert_eq!(h.entries.len(), MAX_UNMARKED_LIVE + 1);
        assert!(h.get(&first).is_some());
        let pngs = std::fs::read_dir(dir.path().join("images")).unwrap().count();
        assert_eq!(pngs, MAX_UNMARKED_LIVE + 1, "pruned entries' files are deleted");
    }

    /// Clean up removes rejected images and unmarked Turbo images nothing
    /// was made from, with their files; what was kept, starred, refined or
    /// is on screen stays, after a restart too.
    #[test]
    fn clean_up_removes_the_rejected_and_unmarked_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        let (mut h, _) = History::load(&paths);
        let mut add = |slot, job, parent: Option<&String>, mark| {
            let (id, r) = h.add(slot, job, GenerationMetadata::default(), parent.cloned(), 1, Arc::new(img()));
            r.unwrap();
            h.get_mut(&id).unwrap().mark = mark;
            id
        };
        let plain = add(ModelSlot::Turbo, JobKind::Variation, None, Mark::None);
        let rejected = add(ModelSlot::Turbo, JobKind::Variation, None, Mark::Rejected);
        let kept = add(ModelSlot::Turbo, JobKind::Variation, None, Mark::Kept);
        let starred = add(ModelSlot::Turbo, JobKind::Live, None, Mark::Starred);
        let refined = add(ModelSlot::Turbo, JobKind::Live, None, Mark::None);
        let base = add(ModelSlot::Base, JobKind::Refine, Some(&refined), Mark::None);
        let rejected_base = add(ModelSlot::Base, JobKind::Refine, Some(&kept), Mark::Rejected);
        let on_screen = add(ModelSlot::Turbo, JobKind::Live, None, Mark::None);
        // Rejected and on screen: rejected wins.
        let gone = h.cleanup_candidates(&[on_screen.as_str(), rejected.as_str()]);
        assert_eq!(gone, [plain.clone(), rejected.clone(), rejected_base.clone()]);
        let bytes = h.disk_bytes(&gone);
        assert!(bytes > 0 && bytes == h.disk_bytes(std::slice::from_ref(&plain)) * 3, "{bytes}");
        h.remove(&gone.iter().cloned().collect()).unwrap();
        let left = |h: &History| h.entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        let expected = [kept, starred, refined, base, on_screen];
        assert_eq!(left(&h), expected);
        let files = std::fs::read_dir(dir.path().join("images")).unwrap().count();
        assert_eq!(files, expected.len(), "the removed images' files are deleted");
        let (back, warn) = History::load(&paths);
        assert!(warn.is_none());
        assert_eq!(left(&back), expected);
        assert!(back.cleanup_candidates(&[]).len() == 1, "only the image that was on screen");
    }

    #[test]
    fn unwritable_data_dir_keeps_the_entry_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let (mut h, _) = History::load(&Paths::at(blocker.join("data")));
        let (id, r) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        assert!(r.is_err());
        assert!(h.get(&id).is_some());
    }

    /// A full or unwritable disk loses no image while the app runs: it is
    /// shown from memory, written again on retry once there is room, and
    /// then read from its file.
    #[test]
    fn an_image_the_disk_refused_is_kept_and_written_on_retry() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::at(dir.path());
        std::fs::write(paths.images_dir(), "a file where the images folder goes").unwrap();
        let (mut h, _) = History::load(&paths);
        let (id, r) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        assert!(r.is_err());
        assert_eq!((h.failed_writes(), h.unwritten()), (1, 1));
        let entry = h.get(&id).unwrap().clone();
        assert_eq!(h.load_image(&entry).unwrap(), img(), "shown from memory");
        assert_eq!(h.retry_writes(), 1, "retried");
        assert_eq!(h.failed_writes(), 1, "still no room");
        std::fs::remove_file(paths.images_dir()).unwrap();
        assert_eq!(h.retry_writes(), 1);
        assert_eq!((h.failed_writes(), h.unwritten()), (0, 0));
        assert_eq!(read_rgb(&h.image_path(&entry)).unwrap(), img(), "on disk now");
        assert!(std::fs::read_to_string(paths.history_file()).unwrap().contains(&entry.file), "and in the index");
        // A removed entry is not written any more.
        std::fs::remove_dir_all(paths.images_dir()).unwrap();
        std::fs::write(paths.images_dir(), "x").unwrap();
        let (id2, _) = h.add(ModelSlot::Turbo, JobKind::Live, GenerationMetadata::default(), None, 1, Arc::new(img()));
        h.remove(&[id2].into_iter().collect()).unwrap();
        assert_eq!((h.failed_writes(), h.retry_writes()), (0, 0));
    }
}
