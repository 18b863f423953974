//! The API endpoint a request is for: picked once from the path, and used as a bounded label
//! (metrics, the status page) and to tell the engine's calls from the others.

/// The API endpoint a request is for, as a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Embeddings,
    ChatCompletions,
    Completions,
    Responses,
    Models,
    Files,
    Other,
}

impl Route {
    /// How many routes there are (the variants above).
    pub(crate) const COUNT: usize = 7;

    /// Classifies a request path; OpenAI's `/v1/...` paths and Azure's
    /// `/openai/deployments/{name}/...` paths alike.
    pub fn of(path: &str) -> Route {
        let rest = path
            .strip_prefix("/v1/")
            .or_else(|| {
                path.strip_prefix("/openai/deployments/")
                    .and_then(|r| r.split_once('/').map(|(_, tail)| tail))
            })
            .or_else(|| path.strip_prefix("/openai/"))
            .unwrap_or(path.trim_start_matches('/'));
        let first = rest.split(['/', '?']).next().unwrap_or("");
        match first {
            "embeddings" => Route::Embeddings,
            "chat" => Route::ChatCompletions,
            "completions" => Route::Completions,
            "responses" => Route::Responses,
            "models" => Route::Models,
            "files" | "uploads" => Route::Files,
            _ => Route::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Embeddings => "embeddings",
            Route::ChatCompletions => "chat_completions",
            Route::Completions => "completions",
            Route::Responses => "responses",
            Route::Models => "models",
            Route::Files => "files",
            Route::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_classified_for_openai_and_azure_paths() {
        assert_eq!(Route::of("/v1/embeddings"), Route::Embeddings);
        assert_eq!(
            Route::of("/openai/deployments/my-emb/embeddings"),
            Route::Embeddings
        );
        assert_eq!(Route::of("/v1/chat/completions"), Route::ChatCompletions);
        assert_eq!(
            Route::of("/v1/models/text-embedding-3-small"),
            Route::Models
        );
        assert_eq!(Route::of("/v1/files/file-abc/content"), Route::Files);
        assert_eq!(Route::of("/anything/else"), Route::Other);
        assert_eq!(Route::of("/"), Route::Other);
    }
}
