-- Generated from etl/store.py (the source of truth) by `make schema`; do not edit.
-- Dialect: postgresql. The pipeline creates these tables itself on first use.

CREATE TABLE appointments (
	clinic_id VARCHAR(64) NOT NULL,
	appointment_id VARCHAR(128) NOT NULL,
	patient_id VARCHAR(128),
	status VARCHAR(16) NOT NULL,
	status_known BOOLEAN NOT NULL,
	start_at BIGINT NOT NULL,
	updated_at BIGINT,
	revenue FLOAT NOT NULL,
	currency VARCHAR(3),
	location_id VARCHAR(128),
	consent_marketing BOOLEAN NOT NULL,
	consent_at BIGINT,
	consent_revoked_at BIGINT,
	is_test BOOLEAN NOT NULL,
	em_g VARCHAR(64),
	em_m VARCHAR(64),
	ph_g VARCHAR(64),
	ph_m VARCHAR(64),
	fn_g VARCHAR(64),
	ln_g VARCHAR(64),
	fn_m VARCHAR(64),
	ln_m VARCHAR(64),
	ct_m VARCHAR(64),
	st_m VARCHAR(64),
	zp_m VARCHAR(64),
	country_m VARCHAR(64),
	postal_code VARCHAR(64),
	country_code VARCHAR(64),
	load_seq BIGINT NOT NULL,
	PRIMARY KEY (clinic_id, appointment_id)
);
CREATE TABLE audience_pending (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	member_key VARCHAR(64) NOT NULL,
	payload TEXT NOT NULL,
	run_id VARCHAR(200),
	recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id, destination, member_key)
);
CREATE TABLE audience_state (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	member_key VARCHAR(64) NOT NULL,
	payload TEXT NOT NULL,
	synced_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id, destination, member_key)
);
CREATE TABLE audience_sync_log (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	synced_at TIMESTAMP WITH TIME ZONE NOT NULL,
	adds INTEGER NOT NULL,
	removes INTEGER NOT NULL,
	full_resync BOOLEAN NOT NULL,
	PRIMARY KEY (clinic_id, destination, run_id, synced_at)
);
CREATE TABLE audience_syncs (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	run_end TIMESTAMP WITH TIME ZONE NOT NULL,
	synced_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id, destination, run_id)
);
CREATE TABLE audit_chain (
	clinic_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	recorded_at VARCHAR(40) NOT NULL,
	kind VARCHAR(32) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	record TEXT NOT NULL,
	prev_sha256 VARCHAR(64) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	PRIMARY KEY (clinic_id, seq)
);
CREATE TABLE conversions (
	clinic_id VARCHAR(64) NOT NULL,
	opaque_id VARCHAR(64) NOT NULL,
	stage VARCHAR(16) NOT NULL,
	person_key VARCHAR(64) NOT NULL,
	event_time BIGINT NOT NULL,
	ready_at BIGINT NOT NULL,
	value FLOAT,
	outcome VARCHAR(32) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	consent_at BIGINT,
	consent_stated BOOLEAN,
	PRIMARY KEY (clinic_id, opaque_id)
);
CREATE TABLE journey_siblings (
	clinic_id VARCHAR(64) NOT NULL,
	opaque_id VARCHAR(64) NOT NULL,
	sibling_id VARCHAR(64) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
	horizon TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id, opaque_id, sibling_id)
);
CREATE TABLE journey_views (
	clinic_id VARCHAR(64) NOT NULL,
	opaque_id VARCHAR(64) NOT NULL,
	horizon TIMESTAMP WITH TIME ZONE NOT NULL,
	viewed_at TIMESTAMP WITH TIME ZONE NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	PRIMARY KEY (clinic_id, opaque_id, horizon)
);
CREATE TABLE leads (
	clinic_id VARCHAR(64) NOT NULL,
	lead_id VARCHAR(128) NOT NULL,
	created_at BIGINT NOT NULL,
	gclid VARCHAR(256),
	gbraid VARCHAR(256),
	wbraid VARCHAR(256),
	fbclid VARCHAR(512),
	fbc VARCHAR(512),
	fbp VARCHAR(256),
	consent_marketing BOOLEAN NOT NULL,
	consent_at BIGINT,
	consent_revoked_at BIGINT,
	is_test BOOLEAN NOT NULL,
	em_g VARCHAR(64),
	em_m VARCHAR(64),
	ph_g VARCHAR(64),
	ph_m VARCHAR(64),
	fn_g VARCHAR(64),
	ln_g VARCHAR(64),
	fn_m VARCHAR(64),
	ln_m VARCHAR(64),
	ct_m VARCHAR(64),
	st_m VARCHAR(64),
	zp_m VARCHAR(64),
	country_m VARCHAR(64),
	postal_code VARCHAR(64),
	country_code VARCHAR(64),
	load_seq BIGINT NOT NULL,
	PRIMARY KEY (clinic_id, lead_id)
);
CREATE TABLE ledger_targets (
	clinic_id VARCHAR(64) NOT NULL,
	target VARCHAR(16) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	claimed_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id)
);
CREATE TABLE persons (
	clinic_id VARCHAR(64) NOT NULL,
	person_key VARCHAR(64) NOT NULL,
	appointments INTEGER NOT NULL,
	leads INTEGER NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	PRIMARY KEY (clinic_id, person_key)
);
CREATE TABLE quality_results (
	run_id VARCHAR(200) NOT NULL,
	suite VARCHAR(64) NOT NULL,
	expectation VARCHAR(64) NOT NULL,
	clinic_id VARCHAR(64) NOT NULL,
	severity VARCHAR(16) NOT NULL,
	success BOOLEAN NOT NULL,
	unexpected_count BIGINT,
	element_count BIGINT,
	recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (run_id, suite, expectation)
);
CREATE TABLE request_checks (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	request_id VARCHAR(128) NOT NULL,
	method VARCHAR(40) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	records INTEGER NOT NULL,
	sent_at TIMESTAMP WITH TIME ZONE NOT NULL,
	status VARCHAR(20) NOT NULL,
	errors TEXT,
	checks INTEGER NOT NULL,
	checked_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (clinic_id, destination, request_id)
);
CREATE TABLE run_summaries (
	run_id VARCHAR(200) NOT NULL,
	recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
	clinic_id VARCHAR(64) NOT NULL,
	start VARCHAR(40) NOT NULL,
	"end" VARCHAR(40) NOT NULL,
	dry_run BOOLEAN NOT NULL,
	target VARCHAR(16) NOT NULL,
	summary TEXT NOT NULL,
	PRIMARY KEY (run_id, recorded_at)
);
CREATE TABLE send_leases (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	holder VARCHAR(300) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	host VARCHAR(255) NOT NULL,
	pid INTEGER NOT NULL,
	acquired_at TIMESTAMP WITH TIME ZONE NOT NULL,
	renewed_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (clinic_id, destination)
);
CREATE TABLE send_ledger (
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	opaque_id VARCHAR(64) NOT NULL,
	stage VARCHAR(16),
	status VARCHAR(16) NOT NULL,
	code VARCHAR(255),
	request_id VARCHAR(128),
	run_id VARCHAR(200) NOT NULL,
	planned_at TIMESTAMP WITH TIME ZONE,
	sent_at TIMESTAMP WITH TIME ZONE,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	consent_at TIMESTAMP WITH TIME ZONE,
	consent_stated BOOLEAN,
	PRIMARY KEY (clinic_id, destination, opaque_id)
);
CREATE TABLE send_stops (
	clinic_id VARCHAR(64) NOT NULL,
	platform VARCHAR(16) NOT NULL,
	reason VARCHAR(32) NOT NULL,
	stopped_by VARCHAR(64) NOT NULL,
	stopped_at VARCHAR(40) NOT NULL,
	PRIMARY KEY (clinic_id, platform)
);
CREATE TABLE validation_sends (
	id SERIAL NOT NULL,
	clinic_id VARCHAR(64) NOT NULL,
	destination VARCHAR(32) NOT NULL,
	target VARCHAR(16) NOT NULL,
	run_id VARCHAR(200) NOT NULL,
	sent_at TIMESTAMP WITH TIME ZONE NOT NULL,
	opaque_id VARCHAR(64),
	stage VARCHAR(16),
	code VARCHAR(255),
	request_id VARCHAR(128),
	adds INTEGER,
	removes INTEGER,
	PRIMARY KEY (id)
);
CREATE INDEX ix_journey_siblings_reverse ON journey_siblings (clinic_id, sibling_id, opaque_id);
CREATE INDEX ix_request_checks_open ON request_checks (clinic_id, destination, status);
CREATE INDEX ix_validation_sends_clinic_time ON validation_sends (clinic_id, sent_at);
