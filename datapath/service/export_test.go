package service

// Batches is how many changes mgr wrote batched.
func Batches(mgr *Manager) uint64 { return mgr.batches }
