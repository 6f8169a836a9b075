{{/* Names, labels and the shared model-repository volume of the ltrec chart. */}}

{{- define "ltrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ltrec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ltrec.triton.fullname" -}}
{{- printf "%s-triton" (include "ltrec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The headless Service: one DNS record per ready Triton pod, for the gateways' round_robin. */}}
{{- define "ltrec.triton.headlessName" -}}
{{- printf "%s-triton-headless" (include "ltrec.fullname" . | trunc 46 | trimSuffix "-") }}
{{- end }}

{{/* The gateways' gRPC target for Triton: every ready pod of the headless Service. */}}
{{- define "ltrec.triton.grpcTarget" -}}
{{- printf "dns:///%s.%s.svc:%v" (include "ltrec.triton.headlessName" .) .Release.Namespace .Values.triton.ports.grpc }}
{{- end }}

{{- define "ltrec.gateway.fullname" -}}
{{- printf "%s-gateway" (include "ltrec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ltrec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ltrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ltrec
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "triton"). */}}
{{- define "ltrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ltrec.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ltrec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ltrec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ltrec.image" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* Pod annotations that roll both Deployments when the model version changes. */}}
{{- define "ltrec.modelAnnotations" -}}
ltrec.io/model-version: {{ .Values.model.version | quote }}
ltrec.io/model-source: {{ .Values.model.source | quote }}
{{- end }}

{{/*
The model repository volume. source=pvc: an existing claim, mounted read-only.
source=objectStore: an emptyDir that the "fetch-model" init container fills (one per pod: an
emptyDir is never shared between pods, so Triton and the gateway each download the bundle).
*/}}
{{- define "ltrec.modelVolume" -}}
- name: model-repository
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    {{- with .Values.model.objectStore.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "ltrec.modelMount" -}}
- name: model-repository
  mountPath: {{ .Values.model.mountPath }}
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
  readOnly: true
{{- end }}

{{- define "ltrec.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "ltrec.fetchModelInitContainer" -}}
{{- if eq .Values.model.source "objectStore" }}
{{- $os := .Values.model.objectStore }}
- name: fetch-model
  image: {{ include "ltrec.image" $os.image }}
  imagePullPolicy: {{ $os.image.pullPolicy }}
  command:
    {{- toYaml $os.command | nindent 4 }}
  env:
    - name: MODEL_VERSION
      value: {{ .Values.model.version | quote }}
    - name: MODEL_BUNDLE_URL
      value: {{ tpl $os.bundleUrl . | quote }}
    - name: MODEL_DIR
      value: {{ .Values.model.mountPath | quote }}
    - name: HOME
      value: /tmp
    {{- with $os.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $os.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "ltrec.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml $os.resources | nindent 4 }}
  volumeMounts:
    - name: model-repository
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
