package agent

import (
	"encoding/json"
	"net/http"
	"sync"
	"time"
)

// health is kube-proxy's /healthz contract: healthy once the first full
// sync has programmed the API's state, and while syncs keep succeeding.
type health struct {
	mu          sync.Mutex
	synced      bool
	lastUpdated time.Time
	lastErr     error
}

func (h *health) record(err error, full bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastErr = err
	if err == nil {
		h.lastUpdated = time.Now()
		h.synced = h.synced || full
	}
}

// Healthy reports the state /healthz serves, and why when unhealthy.
func (h *health) Healthy() (bool, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case !h.synced && h.lastErr != nil:
		return false, "first full sync failed: " + h.lastErr.Error()
	case !h.synced:
		return false, "first full sync not done"
	case h.lastErr != nil:
		return false, "last sync failed: " + h.lastErr.Error()
	}
	return true, ""
}

type healthJSON struct {
	LastUpdated string `json:"lastUpdated"`
	CurrentTime string `json:"currentTime"`
	Error       string `json:"error,omitempty"`
}

func (h *health) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	ok, why := h.Healthy()
	h.mu.Lock()
	body := healthJSON{CurrentTime: time.Now().UTC().Format(time.RFC3339Nano), Error: why}
	if !h.lastUpdated.IsZero() {
		body.LastUpdated = h.lastUpdated.UTC().Format(time.RFC3339Nano)
	}
	h.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	json.NewEncoder(w).Encode(body)
}
