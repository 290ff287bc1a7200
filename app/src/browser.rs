//! Small wrappers over the browser APIs the app needs: picked files,
//! downloads, timers and the Origin Private File System.

use js_sys::{Array, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, BlobPropertyBag, File, FileList, FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetDirectoryOptions, FileSystemGetFileOptions,
    FileSystemRemoveOptions, FileSystemWritableFileStream, HtmlAnchorElement, Url,
};

use trainer_core::train::storage::{Change, MemoryStorage, Storage};

/// A JavaScript error as text.
pub fn js_error(value: JsValue) -> String {
    value.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| value.as_string()).unwrap_or_else(|| format!("{value:?}"))
}

/// The page's window (not available in the worker).
pub fn window() -> web_sys::Window {
    web_sys::window().expect("a browser window")
}

/// `navigator` of the page or of the worker.
pub fn navigator() -> JsValue {
    Reflect::get(&js_sys::global(), &"navigator".into()).unwrap_or(JsValue::UNDEFINED)
}

/// A JavaScript object's numeric field; None when it is missing or not a number.
pub fn number_field(object: &JsValue, key: &str) -> Option<f64> {
    Reflect::get(object, &key.into()).ok()?.as_f64()
}

/// A JavaScript object's field that is itself an object; None otherwise.
pub fn object_field(object: &JsValue, key: &str) -> Option<JsValue> {
    Reflect::get(object, &key.into()).ok().filter(JsValue::is_object)
}

/// Milliseconds since the page or worker started.
pub fn now_ms() -> f64 {
    Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map(|p| p.now())
        .unwrap_or_else(js_sys::Date::now)
}

/// Lets the event loop run (messages, repaints) before going on.
pub async fn sleep(ms: i32) {
    let global = js_sys::global();
    let set_timeout: js_sys::Function = Reflect::get(&global, &"setTimeout".into()).expect("setTimeout").unchecked_into();
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let _ = set_timeout.call2(&global, &resolve, &JsValue::from(ms));
    });
    let _ = JsFuture::from(promise).await;
}

/// A Web Lock (`navigator.locks`, shared by every tab and worker of this
/// origin), held until dropped.
pub struct WebLock {
    /// Resolves the promise the lock's callback returned, which releases it.
    release: Option<js_sys::Function>,
}

impl Drop for WebLock {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.call0(&JsValue::NULL);
        }
    }
}

/// Takes the Web Lock `name` unless another tab or worker holds it
/// (`None` then). A browser without Web Locks gets a lock that guards nothing.
pub async fn try_lock(name: &str) -> Result<Option<WebLock>, String> {
    let locks = Reflect::get(&navigator(), &"locks".into()).unwrap_or(JsValue::UNDEFINED);
    if locks.is_undefined() {
        return Ok(Some(WebLock { release: None }));
    }
    // The lock stays held while the promise its callback returns is pending.
    let mut release = None;
    let held = js_sys::Promise::new(&mut |resolve, _| release = Some(resolve));
    let mut decide = None;
    let decided = js_sys::Promise::new(&mut |resolve, _| decide = Some(resolve));
    let decide: js_sys::Function = decide.expect("Promise::new calls its executor at once");
    let callback = wasm_bindgen::closure::Closure::once_into_js(move |lock: JsValue| -> JsValue {
        let granted = !lock.is_null();
        let _ = decide.call1(&JsValue::NULL, &granted.into());
        if granted {
            held.into()
        } else {
            JsValue::UNDEFINED
        }
    });
    let options = js_sys::Object::new();
    Reflect::set(&options, &"ifAvailable".into(), &true.into()).map_err(js_error)?;
    let request: js_sys::Function = Reflect::get(&locks, &"request".into()).map_err(js_error)?.unchecked_into();
    request.call3(&locks, &name.into(), &options, &callback).map_err(js_error)?;
    let granted = JsFuture::from(decided).await.map_err(js_error)?.is_truthy();
    Ok(granted.then(|| WebLock { release }))
}

/// A picked file: its path inside the picked folder (without the folder's
/// own name) and the `File` handle, read later.
#[derive(Clone)]
pub struct PickedFile {
    pub path: String,
    pub file: File,
}

impl PickedFile {
    pub async fn bytes(&self) -> Result<Vec<u8>, String> {
        let buffer = JsFuture::from(self.file.array_buffer()).await.map_err(|e| format!("{}: {}", self.path, js_error(e)))?;
        Ok(Uint8Array::new(&buffer).to_vec())
    }
}

/// The files of a file input or a drop. For a folder pick, paths drop the
/// picked folder's own name (`robots/a.jpg` becomes `a.jpg`).
pub fn picked_files(list: Option<FileList>) -> Vec<PickedFile> {
    let Some(list) = list else { return Vec::new() };
    let mut files = Vec::new();
    for i in 0..list.length() {
        let Some(file) = list.item(i) else { continue };
        let relative = Reflect::get(&file, &JsValue::from_str("webkitRelativePath")).ok().and_then(|v| v.as_string()).unwrap_or_default();
        let path = match relative.split_once('/') {
            Some((_, inside)) if !relative.is_empty() => inside.to_string(),
            _ => file.name(),
        };
        files.push(PickedFile { path, file });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// Offers bytes as a download named `name`.
pub fn download(name: &str, bytes: &[u8], mime: &str) -> Result<(), String> {
    let url = object_url(bytes, mime)?;
    let document = window().document().ok_or("no document")?;
    let anchor: HtmlAnchorElement = document.create_element("a").map_err(js_error)?.unchecked_into();
    anchor.set_href(&url);
    anchor.set_download(name);
    anchor.click();
    // The click has started the download; the URL can go after a moment.
    let revoke = js_sys::Function::new_no_args(&format!("URL.revokeObjectURL({url:?})"));
    let _ = window().set_timeout_with_callback_and_timeout_and_arguments_0(&revoke, 60_000);
    Ok(())
}

/// An object URL for showing bytes (a PNG) in an `<img>`.
pub fn object_url(bytes: &[u8], mime: &str) -> Result<String, String> {
    let parts = Array::of1(&Uint8Array::from(bytes));
    let options = BlobPropertyBag::new();
    options.set_type(mime);
    let blob = Blob::new_with_u8_array_sequence_and_options(&parts, &options).map_err(js_error)?;
    Url::create_object_url_with_blob(&blob).map_err(js_error)
}

/// The Origin Private File System, under a `burnbooth/` folder. Storage
/// paths map to OPFS paths segment by segment; `..` and `.` (allowed in
/// config paths) get names OPFS accepts.
pub mod opfs {
    use super::*;

    const ROOT: &str = "burnbooth";
    const PARENT: &str = "%2E%2E";

    fn to_segments(path: &str) -> Vec<String> {
        path.split('/').filter(|s| !s.is_empty() && *s != ".").map(|s| if s == ".." { PARENT.to_string() } else { s.to_string() }).collect()
    }

    fn from_segments(segments: &[String]) -> String {
        segments.iter().map(|s| if s == PARENT { ".." } else { s.as_str() }).collect::<Vec<_>>().join("/")
    }

    fn storage_manager() -> web_sys::StorageManager {
        Reflect::get(&navigator(), &"storage".into()).expect("navigator.storage").unchecked_into()
    }

    async fn root() -> Result<FileSystemDirectoryHandle, String> {
        let storage = storage_manager();
        let handle =
            JsFuture::from(storage.get_directory()).await.map_err(|e| format!("the browser's private storage (OPFS) is not available: {}", js_error(e)))?;
        directory(&handle.unchecked_into(), ROOT, true).await
    }

    async fn directory(parent: &FileSystemDirectoryHandle, name: &str, create: bool) -> Result<FileSystemDirectoryHandle, String> {
        let options = FileSystemGetDirectoryOptions::new();
        options.set_create(create);
        let handle = JsFuture::from(parent.get_directory_handle_with_options(name, &options)).await.map_err(js_error)?;
        Ok(handle.unchecked_into())
    }

    /// The folder holding `path`'s last segment under `base`, created when `create`.
    async fn parent_in(base: FileSystemDirectoryHandle, segments: &[String], create: bool) -> Result<FileSystemDirectoryHandle, String> {
        let mut dir = base;
        for segment in &segments[..segments.len().saturating_sub(1)] {
            dir = directory(&dir, segment, create).await?;
        }
        Ok(dir)
    }

    async fn parent_of(segments: &[String], create: bool) -> Result<FileSystemDirectoryHandle, String> {
        parent_in(root().await?, segments, create).await
    }

    pub async fn write(path: &str, bytes: &[u8]) -> Result<(), String> {
        write_in(root().await?, path, bytes).await
    }

    /// Writes a file under a folder handle (OPFS, or a folder the user granted).
    /// A file is never present half-written: an existing one is replaced
    /// by its writable stream's swap file on close, and a new one is written
    /// under a `.partial` name and renamed once whole, since creating the
    /// handle makes an empty file at once that an interrupted write (a
    /// closed tab) would leave looking like a finished one.
    pub async fn write_in(base: FileSystemDirectoryHandle, path: &str, bytes: &[u8]) -> Result<(), String> {
        let segments = to_segments(path);
        let Some(name) = segments.last() else { return Err(format!("empty path '{path}'")) };
        let dir = parent_in(base, &segments, true).await.map_err(|e| format!("{path}: {e}"))?;
        write_named(&dir, name, bytes).await.map_err(|e| write_error(path, e))
    }

    async fn write_named(dir: &FileSystemDirectoryHandle, name: &str, bytes: &[u8]) -> Result<(), JsValue> {
        if let Ok(existing) = JsFuture::from(dir.get_file_handle(name)).await {
            return write_whole(&existing.unchecked_into(), bytes).await;
        }
        let partial = format!("{name}{PARTIAL}");
        let file = file_handle(dir, &partial).await?;
        if let Err(e) = write_whole(&file, bytes).await {
            // Nothing half-made stays behind (a full storage's failure included).
            let _ = JsFuture::from(dir.remove_entry(&partial)).await;
            return Err(e);
        }
        if rename(&file, name).await.is_err() {
            // A browser without `move()` on this folder: write in place.
            write_whole(&file_handle(dir, name).await?, bytes).await?;
            let _ = JsFuture::from(dir.remove_entry(&partial)).await;
        }
        Ok(())
    }

    /// Names a file while it is being written; such leftovers are removed on load.
    const PARTIAL: &str = ".partial";

    async fn file_handle(dir: &FileSystemDirectoryHandle, name: &str) -> Result<FileSystemFileHandle, JsValue> {
        let options = FileSystemGetFileOptions::new();
        options.set_create(true);
        Ok(JsFuture::from(dir.get_file_handle_with_options(name, &options)).await?.unchecked_into())
    }

    async fn write_whole(file: &FileSystemFileHandle, bytes: &[u8]) -> Result<(), JsValue> {
        let stream: FileSystemWritableFileStream = JsFuture::from(file.create_writable()).await?.unchecked_into();
        if let Err(e) = JsFuture::from(stream.write_with_u8_array(bytes)?).await {
            // Drops the swap file: the old content (or none) stays.
            let _ = JsFuture::from(stream.abort()).await;
            return Err(e);
        }
        JsFuture::from(stream.close()).await?;
        Ok(())
    }

    /// `FileSystemHandle.move(newName)` (Chrome 110+ in OPFS).
    async fn rename(file: &FileSystemFileHandle, name: &str) -> Result<(), JsValue> {
        let rename: js_sys::Function = Reflect::get(file, &"move".into())?.dyn_into()?;
        let promise: js_sys::Promise = rename.call1(file, &name.into())?.dyn_into()?;
        JsFuture::from(promise).await?;
        Ok(())
    }

    /// How a user frees browser storage.
    const FREE_SPACE: &str = "free space (the Train panel's \"Clear saved data\", or other sites' data)";

    /// A failed write as text; a full storage says so and what to do.
    fn write_error(path: &str, error: JsValue) -> String {
        let quota = Reflect::get(&error, &"name".into()).ok().and_then(|n| n.as_string()).is_some_and(|n| n == "QuotaExceededError");
        match quota {
            true => format!(
                "{path}: the browser's storage for this page is full ({}); what was saved before stays, and the files not yet saved are kept in this tab and saved again at the next attempt: {FREE_SPACE} and resume",
                js_error(error)
            ),
            false => format!("{path}: {}", js_error(error)),
        }
    }

    /// Asks the user for a folder to write into (Chrome/Edge's directory picker).
    pub async fn pick_folder() -> Result<FileSystemDirectoryHandle, String> {
        let picker: js_sys::Function = Reflect::get(&js_sys::global(), &"showDirectoryPicker".into())
            .ok()
            .and_then(|f| f.dyn_into().ok())
            .ok_or("this browser cannot write to a folder you choose; use the download buttons")?;
        let options = js_sys::Object::new();
        let _ = Reflect::set(&options, &"mode".into(), &"readwrite".into());
        let promise: js_sys::Promise = picker.call1(&js_sys::global(), &options).map_err(js_error)?.unchecked_into();
        Ok(JsFuture::from(promise).await.map_err(js_error)?.unchecked_into())
    }

    pub async fn remove(path: &str) -> Result<(), String> {
        let segments = to_segments(path);
        let Some(name) = segments.last() else { return Ok(()) };
        let Ok(dir) = parent_of(&segments, false).await else { return Ok(()) };
        let options = FileSystemRemoveOptions::new();
        options.set_recursive(true);
        // Absent is fine.
        let _ = JsFuture::from(dir.remove_entry_with_options(name, &options)).await;
        Ok(())
    }

    /// Removes everything the app saved.
    pub async fn clear() -> Result<(), String> {
        let storage = storage_manager();
        let handle: FileSystemDirectoryHandle = JsFuture::from(storage.get_directory()).await.map_err(js_error)?.unchecked_into();
        let options = FileSystemRemoveOptions::new();
        options.set_recursive(true);
        let _ = JsFuture::from(handle.remove_entry_with_options(ROOT, &options)).await;
        Ok(())
    }

    /// Every saved file, loaded into `storage` (without recording changes).
    /// Returns how many files were loaded.
    pub async fn load_into(storage: &MemoryStorage) -> Result<usize, String> {
        let mut pending = vec![(root().await?, Vec::<String>::new())];
        let mut count = 0;
        while let Some((dir, prefix)) = pending.pop() {
            let entries = dir.values();
            loop {
                let next = JsFuture::from(entries.next().map_err(js_error)?).await.map_err(js_error)?;
                if Reflect::get(&next, &"done".into()).map(|d| d.is_truthy()).unwrap_or(true) {
                    break;
                }
                let handle = Reflect::get(&next, &"value".into()).map_err(js_error)?;
                let name = Reflect::get(&handle, &"name".into()).ok().and_then(|n| n.as_string()).unwrap_or_default();
                let kind = Reflect::get(&handle, &"kind".into()).ok().and_then(|n| n.as_string()).unwrap_or_default();
                if kind == "file" && name.ends_with(PARTIAL) {
                    // A write that never finished (the tab closed): not a file.
                    let _ = JsFuture::from(dir.remove_entry(&name)).await;
                    continue;
                }
                let mut segments = prefix.clone();
                segments.push(name);
                if kind == "directory" {
                    pending.push((handle.unchecked_into(), segments));
                } else {
                    let file: FileSystemFileHandle = handle.unchecked_into();
                    let file: File = JsFuture::from(file.get_file()).await.map_err(js_error)?.unchecked_into();
                    let buffer = JsFuture::from(file.array_buffer()).await.map_err(js_error)?;
                    storage.preload(&from_segments(&segments), Uint8Array::new(&buffer).to_vec());
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Applies the storage's changes since the last sync to OPFS, in order.
    /// On a failure (a full storage) the changes not yet applied go back to
    /// the storage, to be retried by the next sync, and the error is returned.
    pub async fn sync(storage: &MemoryStorage) -> Result<usize, String> {
        let changes = storage.take_changes();
        let mut written = 0;
        for (i, change) in changes.iter().enumerate() {
            let applied = match change {
                // A file written again later (appends to metrics) is written once, then.
                Change::Written(_) if changes[i + 1..].contains(change) => Ok(()),
                Change::Written(path) => match storage.read(path).map_err(|e| e.to_string())? {
                    Some(bytes) => write(path, &bytes).await.map(|()| written += 1),
                    None => Ok(()),
                },
                Change::Removed(path) => remove(path).await,
            };
            if let Err(error) = applied {
                storage.requeue(changes[i..].to_vec());
                return Err(error);
            }
        }
        Ok(written)
    }

    /// Calls `navigator.storage.<method>()` when this context has it (the
    /// page has `persist`, workers only `persisted`), and awaits its promise.
    async fn call_storage(method: &str) -> Option<JsValue> {
        let storage = storage_manager();
        let function: js_sys::Function = Reflect::get(&storage, &method.into()).ok()?.dyn_into().ok()?;
        let promise: js_sys::Promise = function.call0(&storage).ok()?.dyn_into().ok()?;
        JsFuture::from(promise).await.ok()
    }

    /// Asks the browser to keep this page's storage under pressure rather
    /// than evict it (`navigator.storage.persist()`, page only); whether it
    /// agreed.
    pub async fn ask_persistence() -> bool {
        call_storage("persist").await.is_some_and(|granted| granted.is_truthy())
    }

    /// Says how much storage is used and free, and whether it is persistent.
    /// `Err` when less than `needed_mb` is free.
    pub async fn prepare(needed_mb: f64) -> Result<String, String> {
        let persistent = call_storage("persisted").await.is_some_and(|p| p.is_truthy());
        let estimate = call_storage("estimate").await.ok_or("the browser cannot say how much storage is free (navigator.storage.estimate)")?;
        let megabytes = |key: &str| number_field(&estimate, key).unwrap_or(0.0) / 1e6;
        let (usage, quota) = (megabytes("usage"), megabytes("quota"));
        let kept = if persistent { "kept" } else { "may be evicted under pressure: the browser did not grant persistent storage" };
        let summary = format!("browser storage: {usage:.0} MB used of {quota:.0} MB; {kept}");
        if quota > 0.0 && quota - usage < needed_mb {
            return Err(format!("{summary}; this run needs about {needed_mb:.0} MB more: {FREE_SPACE} and start again"));
        }
        Ok(summary)
    }
}
