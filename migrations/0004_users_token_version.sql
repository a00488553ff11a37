-- Token versions (issue 17): every admin JWT carries its user's version when issued; logout and a
-- password change bump it, so tokens issued before are refused.
ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
